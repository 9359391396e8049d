"""Run the paper-comparison grid (methods x tasks x seeds), one training at a time, resumably.

    python benchmarks/paper/run.py --setting fewshot --tasks cluewsc --budget-minutes 120
    python benchmarks/paper/run.py --setting full --dry-run            # the plan, what is done, the ETA
    python benchmarks/paper/run.py --tiny --runs-dir /tmp/tiny-runs    # the whole harness on a tiny model, seconds

Every finished run becomes one small JSON, ``benchmarks/paper/runs/<setting>/<task>/<method>/seed<k>.json``: the
configuration, the dev curve (step, epoch, seconds, metrics per evaluation), the training loss, the final dev and
test scores, the majority-class baseline, the parameter counts, versions and device, and wall time. A cell whose
JSON exists is skipped, so rerunning the same command continues the grid. The run folders themselves (checkpoints
for ``--output.resume auto``) live in a scratch folder: ``--work-dir``, else ``$FLTUNING_BENCH_DIR``, else
``~/.cache/fltuning/bench``; a run stopped halfway (budget spent, Ctrl-C, SIGTERM) continues from its last
checkpoint. ``benchmarks/paper/report.py`` turns the JSONs into ``docs/results.md`` and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import grid
from splits import carve_files

RUNS_DIR = Path(__file__).resolve().parent / "runs"
SCHEMA = 1


def default_data_dir() -> Path:
    return Path(os.environ.get("FLTUNING_DATA_DIR") or grid.ROOT.parent / "shared" / "data")


def default_work_dir() -> Path:
    return Path(os.environ.get("FLTUNING_BENCH_DIR") or Path.home() / ".cache" / "fltuning" / "bench")


def result_path(runs_dir: Path, cell: grid.Cell) -> Path:
    return runs_dir / cell.setting / cell.task.key / cell.method.key / f"seed{cell.seed}.json"


def run_folder(work_dir: Path, cell: grid.Cell, tiny: bool) -> Path:
    return work_dir / ("tiny-runs" if tiny else "runs") / cell.name


def cell_config(cell: grid.Cell, data_dir: Path, work_dir: Path, model: str, tiny: bool, extra: dict[str, Any]):
    """The cell's ``RunConfig``: the grid's settings, its data files (carved parts drawn here), the model, and a
    quiet, resumable run folder in the scratch folder. Raises ``RunConfigError`` for a bad setting."""
    from tiny import TINY_SETTINGS

    from fltuning.train.config import load_config

    settings = grid.cell_settings(cell)
    settings["data.data_dir"] = str(data_dir)
    split_dir = work_dir / "splits" / cell.setting / cell.task.key
    for carve in cell.task.carve:
        for part, path in carve_files(carve, data_dir, split_dir, cell.seed).items():
            settings[f"data.{part}_file"] = str(path)
    for part, relative in cell.task.files.items():
        settings[f"data.{part}_file"] = str(data_dir / relative)
    settings["model.name"] = model
    if tiny:
        settings |= TINY_SETTINGS
    settings |= extra
    settings |= {
        "output.dir": str(run_folder(work_dir, cell, tiny)),
        "output.resume": "auto",
        "output.progress": False,
        "output.predict": False,
        "output.keep_checkpoints": 1,
        # resumable (optimizer included) at every 10th evaluation and on a stop, best-only between: full
        # fine-tuning's checkpoint is 1.4 GB (~7 s to write here), and few-shot runs evaluate every epoch. A
        # larger-data run evaluates only ~10 times in hours (C3: every 25 of 250 steps, ~20 min apart here), so it
        # saves a resumable one at every 2nd: a machine torn down without a stop loses under an hour
        "output.checkpoint_every": 10 if cell.setting == "fewshot" else 2,
    }
    return load_config(None, settings)


def signature(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The settings that make a run what it is: everything but where files are (data folder, drawn parts, model
    folder, run folder), so runs made on another machine count."""
    data = {k: v for k, v in config["data"].items() if k != "data_dir" and not k.endswith("_file")}
    return {"method": config["method"], "data": data, "train": config["train"], "pooling": config["model"]["pooling"]}


def stale_reason(record: dict[str, Any], config) -> str | None:
    """None when the recorded run has ``config``'s settings, else the first difference, e.g. "train.lr"."""
    before, now = signature(record["config"]), signature(config.to_dict())
    for section in now:
        if not isinstance(now[section], dict):
            if before.get(section) != now[section]:
                return f"model.{section}"
            continue
        for key in sorted(set(now[section]) | set(before.get(section, {}))):
            if before.get(section, {}).get(key) != now[section].get(key):
                return f"{section}.{key}: {before.get(section, {}).get(key)!r} -> {now[section].get(key)!r}"
    return None


def set_aside_if_stale(config, folder: Path) -> None:
    """A run folder left by an earlier grid definition (other settings) cannot be resumed: rename it aside so the
    cell starts afresh (the scratch folder only ever holds reproducible work)."""
    from fltuning.train.config import RunConfigError
    from fltuning.train.run import check_run_folder

    try:
        check_run_folder(config, folder)
    except RunConfigError:
        aside = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        print(f"  {folder} was made with other settings; moved to {aside.name}", flush=True)


def majority_baseline(config) -> dict[str, float]:
    """The score of always answering the training set's most frequent label, on dev and test (classification and
    multiple choice); 0 for NER and reading comprehension, where predicting nothing scores 0."""
    from collections import Counter

    from fltuning.train.data import load_examples

    task, examples = load_examples(config.data)
    if task.kind not in ("classification", "multiple_choice"):
        return {part: 0.0 for part in ("dev", "test") if part in examples}
    counts = Counter(e.label for e in examples["train"] if e.label is not None)
    top = counts.most_common(1)[0][0]
    out = {}
    for part in ("dev", "test"):
        labelled = [e for e in examples.get(part, []) if e.label is not None]
        if labelled:
            out[part] = sum(e.label == top for e in labelled) / len(labelled)
    return out


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rounded(record: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}


def thin(points: list[dict], most: int = 100) -> list[dict]:
    """At most ``most`` evenly spaced points, the last one kept."""
    if len(points) <= most:
        return points
    stride = -(-len(points) // most)
    kept = points[::stride]
    return kept if kept[-1] is points[-1] else kept + [points[-1]]


def run_record(cell: grid.Cell, config, folder: Path, status: str, wall: float, majority: dict) -> dict[str, Any]:
    """The run's JSON: everything the report needs, nothing it does not (no tensors, no predictions)."""
    from fltuning.tasks.registry import get_task, task_spec

    results = json.loads((folder / "results.json").read_text()) if status == "finished" else {}
    metrics = read_jsonl(folder / "metrics.jsonl")
    task_cls = get_task(task_spec(config.data.task).name, **config.data.task_settings)
    run_info = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    return {
        "schema": SCHEMA,
        "setting": cell.setting,
        "task": cell.task.key,
        "method": cell.method.key,
        "seed": cell.seed,
        "status": status,
        "metric": config.train.metric or task_cls.metric,
        "percent": task_cls.kind != "mrc",  # the scorer gives fractions: x100 for the tables (CMRC: already %)
        "config": config.to_dict(),
        "curve": [rounded({k: v for k, v in m.items() if k != "split"}) for m in metrics if m["split"] == "dev"],
        "train_loss": thin(
            [rounded({"step": m["step"], "loss": m["loss"]}) for m in metrics if m["split"] == "train"]
        ),
        "best_step": results.get("best_step"),
        "steps": results.get("steps"),
        "train_seconds": results.get("train_seconds"),
        "dev": results.get("dev"),
        "test": results.get("test"),
        "majority": majority,
        "parameters": results.get("parameters")
        or (json.loads((folder / "parameters.json").read_text()) if (folder / "parameters.json").is_file() else None),
        "method_settings": results.get("method_settings"),
        "versions": run_info.get("versions"),
        "git_revision": run_info.get("git_revision"),
        "device": run_info.get("device"),
        "hardware": run_info.get("hardware"),
        "wall_seconds": round(wall, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def estimate_seconds(cell: grid.Cell, done: list[dict], device: str = "cpu") -> float:
    """Mean wall time of finished runs on this kind of device of the same task and method; else of the task's
    other runs, each rescaled from its method's speed to this cell's as measured over the device's runs (on CPU
    full fine-tuning takes about 1.25x a task's mean, FL-tuning about 0.8x); else the grid's guess."""
    here = [r for r in done if r["device"] == device]
    task = [r for r in here if r["setting"] == cell.setting and r["task"] == cell.task.key]
    same = [r["wall_seconds"] for r in here if same_cell_kind(r, cell)]
    if same:
        return statistics.mean(same)
    if task:
        speed = method_speeds(here)
        want = speed.get(cell.method.key, 1.0)
        return statistics.mean(r["wall_seconds"] * want / speed.get(r["method"], 1.0) for r in task)
    return cell.task.minutes * 60


def seconds_left(cell: grid.Cell, done: list[dict], device: str, folder: Path) -> float:
    """What is left of the cell. A stopped run with a resumable checkpoint goes on at its own pace (seconds spent
    per step so far) for the steps the cell's finished runs took: the estimate may come from other hardware or
    thread counts. Otherwise the cell's estimate less the wall time a stopped run of it has spent so far."""
    from fltuning.train.checkpoint import list_checkpoints

    spent = wall_seconds_spent(folder)
    saved = list_checkpoints(folder, resumable=True)
    steps = [r["steps"] for r in done if same_cell_kind(r, cell) and r.get("steps")]
    if spent and saved and saved[-1][0] and steps:
        step = saved[-1][0]
        return max(spent / step * (statistics.mean(steps) - step), 0.0)
    return max(estimate_seconds(cell, done, device) - spent, 0.0)


def same_cell_kind(run: dict, cell: grid.Cell) -> bool:
    """Whether a finished run's record is of the cell's setting, task and method (any seed)."""
    return (run["setting"], run["task"], run["method"]) == (cell.setting, cell.task.key, cell.method.key)


def method_speeds(runs: list[dict]) -> dict[str, float]:
    """Each method's wall time relative to its task's, the median over the tasks that ran it beside another
    method: within a task a method's mean time over the mean of the task's per-method means."""
    tasks: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in runs:
        tasks.setdefault((r["setting"], r["task"]), {}).setdefault(r["method"], []).append(r["wall_seconds"])
    ratios: dict[str, list[float]] = {}
    for methods in tasks.values():
        if len(methods) < 2:
            continue
        means = {m: statistics.mean(times) for m, times in methods.items()}
        centre = statistics.mean(means.values())
        for m, t in means.items():
            ratios.setdefault(m, []).append(t / centre)
    return {m: statistics.median(r) for m, r in ratios.items()}


def add_wall_seconds(folder: Path, seconds: float) -> float:
    """The run's wall time over all its segments, kept in its folder: a stopped run resumes in a later command, and
    a finished run whose JSON is gone (deleted, or a machine that kept the folder but not the file) is recorded
    again from the folder without training, with the wall time it took."""
    total = seconds + wall_seconds_spent(folder)
    (folder / "wall_seconds.txt").write_text(f"{total:.1f}\n")
    return total


def wall_seconds_spent(folder: Path) -> float:
    """The wall time the run in ``folder`` has recorded over its segments so far; 0 for a run not yet started."""
    path = folder / "wall_seconds.txt"
    return float(path.read_text()) if path.is_file() else 0.0


def claim(claim_dir: Path | None, cell: grid.Cell) -> bool:
    """Whether this worker may run ``cell``: always without ``claim_dir``, else if it is the first to create the
    cell's claim folder (``mkdir`` is atomic). A worker that dies leaves its claim: delete the folder to retry."""
    if claim_dir is None:
        return True
    claim_dir.mkdir(parents=True, exist_ok=True)
    try:
        claim_folder(claim_dir, cell).mkdir()
        return True
    except FileExistsError:
        return False


def release(claim_dir: Path | None, cell: grid.Cell) -> None:
    """Give ``cell`` back, so that the next worker sharing ``claim_dir`` resumes it (a run stopped by its budget)."""
    if claim_dir is not None:
        shutil.rmtree(claim_folder(claim_dir, cell), ignore_errors=True)  # already gone (deleted by hand): fine


def claim_folder(claim_dir: Path, cell: grid.Cell) -> Path:
    return claim_dir / cell.name.replace("/", "_")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def clock(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(grid.SETTINGS), default="fewshot")
    parser.add_argument("--tasks", nargs="+", help="task keys (default: all of the setting, in grid.py's order)")
    parser.add_argument("--methods", nargs="+", help=f"default: all ({', '.join(grid.METHODS)})")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0-4 few-shot (the splits), 0-2 full")
    parser.add_argument("--budget-minutes", type=float, help="stop (resumably) once this much wall time is spent")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the ETA, run nothing")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and a few examples: a smoke test")
    parser.add_argument("--runs-dir", type=Path, help=f"where run JSONs go (default {RUNS_DIR}; --tiny: scratch)")
    parser.add_argument("--work-dir", type=Path, help="scratch for run folders and drawn splits")
    parser.add_argument("--data-dir", type=Path, help="the CLUE/FewCLUE data (default $FLTUNING_DATA_DIR)")
    parser.add_argument("--model", help="model name or folder (default e5-small; --tiny builds its own)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--keep-run-folders", action="store_true", help="keep checkpoints after a run is recorded")
    parser.add_argument(
        "--claim-dir", type=Path, help="parallel workers sharing this folder each take the next unclaimed cell"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra settings for every cell")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = (args.work_dir or default_work_dir()).expanduser().resolve()
    runs_dir = args.runs_dir or (work_dir / "tiny-results" if args.tiny else RUNS_DIR)
    data_dir = (args.data_dir or default_data_dir()).expanduser().resolve()
    try:
        plan = grid.cells(args.setting, args.tasks, args.methods, args.seeds)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    from fltuning.train.config import parse_flag_value

    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set {item!r}: expected KEY=VALUE (e.g. train.epochs=1)", file=sys.stderr)
            return 2
        extra[key] = parse_flag_value(value)

    stale = set()
    for cell in plan:  # a run made under other settings (the grid changed since) is no result of this grid
        path = result_path(runs_dir, cell)
        if path.is_file():
            why = stale_reason(
                json.loads(path.read_text()), cell_config(cell, data_dir, work_dir, "", args.tiny, extra)
            )
            if why and args.dry_run:
                stale.add(cell.name)
                print(f"{cell.name}: made with other settings ({why}); it would run again", flush=True)
            elif why:
                aside = work_dir / "stale-results" / time.strftime("%Y%m%d-%H%M%S") / path.relative_to(runs_dir)
                aside.parent.mkdir(parents=True, exist_ok=True)
                path.rename(aside)
                print(f"{cell.name}: made with other settings ({why}); moved to {aside}; it runs again", flush=True)
    done = [json.loads(p.read_text()) for p in sorted(Path(runs_dir).glob("*/*/*/seed*.json"))]
    device = "cuda" if _cuda_available() else "cpu"
    todo = [c for c in plan if c.name in stale or not result_path(runs_dir, c).is_file()]

    def left(cell: grid.Cell) -> float:  # with ``done`` as it stands: it grows as runs finish
        if cell.name in stale:  # runs again from the start: its folder, made with other settings, is set aside
            return estimate_seconds(cell, done, device)
        return seconds_left(cell, done, device, run_folder(work_dir, cell, args.tiny))

    eta = sum(left(c) for c in todo)
    print(
        f"{args.setting}: {len(plan)} runs in the selection, {len(plan) - len(todo)} done, {len(todo)} to run, "
        f"ETA {clock(eta)} at one run at a time"
        + (f"; budget {clock(args.budget_minutes * 60)}" if args.budget_minutes else ""),
        flush=True,
    )
    if args.dry_run:
        for cell in plan:
            folder = run_folder(work_dir, cell, args.tiny)
            state = "done" if cell not in todo else "partial" if folder.is_dir() else "todo"
            state = "stale" if cell.name in stale else state
            seconds = left(cell) if cell in todo else estimate_seconds(cell, done, device)
            print(f"  {state:8} {cell.name:45} ~{clock(seconds)}")
        return 0
    if not todo:
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from fltuning.train.config import RunConfigError
    from fltuning.train.loop import TrainingDiverged, TrainingStopped
    from fltuning.train.run import train

    model = args.model or "e5-small"
    if args.tiny and not args.model:
        from tiny import build_tiny_model

        model = str(build_tiny_model(work_dir / "tiny-model"))
    started = time.monotonic()
    deadline = started + args.budget_minutes * 60 if args.budget_minutes else None

    def stop_at_deadline(event: str, trainer) -> None:
        if deadline is not None and event == "step" and time.monotonic() > deadline:
            trainer.request_stop()

    failures = 0
    for i, cell in enumerate(todo, 1):
        if deadline is not None and time.monotonic() > deadline:
            print(f"budget spent; {len(todo) - i + 1} runs left: rerun the same command to continue", flush=True)
            return 0
        if result_path(runs_dir, cell).is_file() or not claim(args.claim_dir, cell):
            continue  # finished or taken by another worker since the plan was made
        rest = sum(left(c) for c in todo[i - 1 :])
        budget = f", budget left {clock(deadline - time.monotonic())}" if deadline else ""
        print(
            f"[{i}/{len(todo)}] {cell.name} ~{clock(left(cell))} (ETA of the rest {clock(rest)}{budget})",
            flush=True,
        )
        try:
            config = cell_config(cell, data_dir, work_dir, model, args.tiny, extra)
            majority = majority_baseline(config)
        except (RunConfigError, ValueError, OSError) as err:
            print(f"  skipped: {err}", file=sys.stderr, flush=True)
            failures += 1
            continue
        folder = config.run_dir()
        set_aside_if_stale(config, folder)
        t0 = time.monotonic()
        try:
            train(config, callback=stop_at_deadline)
            status = "finished"
        except TrainingStopped:
            add_wall_seconds(folder, time.monotonic() - t0)
            release(args.claim_dir, cell)
            print(
                f"  stopped (budget spent, or SIGINT/SIGTERM); {folder} resumes when this command runs again",
                flush=True,
            )
            return 0
        except TrainingDiverged as err:
            print(f"  diverged: {err}", file=sys.stderr, flush=True)
            status = "diverged"
        except Exception:  # one broken cell must not stop a grid that runs for hours; the traceback says why
            print(f"  failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            failures += 1
            continue
        record = run_record(cell, config, folder, status, add_wall_seconds(folder, time.monotonic() - t0), majority)
        write_json(result_path(runs_dir, cell), record)
        done.append(record)
        if status == "finished":
            best = record["dev"][record["metric"]]
            test = (record["test"] or {}).get(record["metric"])
            print(
                f"  dev {best:.4f} test {test if test is None else round(test, 4)} in {clock(record['wall_seconds'])}"
            )
        if not args.keep_run_folders:
            for heavy in ("checkpoints", "adapter"):
                shutil.rmtree(folder / heavy, ignore_errors=True)
    print(f"done in {clock(time.monotonic() - started)}" + (f"; {failures} cells failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
