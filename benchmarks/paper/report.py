"""Write ``docs/results.md`` and its plots from the run JSONs of ``run.py``.

    python benchmarks/paper/report.py                        # benchmarks/paper/runs -> docs/results.md, docs/img/
    python benchmarks/paper/report.py --runs-dir R --out O.md --img-dir I

The page is generated: every number in it comes from the run files, and cells not run yet say so.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

import grid
import measures as m
from claims import BASELINES, SPEEDUP, claim_rows, ranking_tasks
from plots import curves_png, spread_png

RUNS_DIR = Path(__file__).resolve().parent / "runs"
OUTSIDE_DIR = RUNS_DIR.parent  # holds diagnostics/ and superseded/
RUN = "python benchmarks/paper/run.py"
REPORT = "python benchmarks/paper/report.py"


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def mean_score(group: list[dict]) -> float | None:
    stats = m.mean_std(m.scores(group))
    return stats[0] if stats else None


def cell_text(group: list[dict], expected: int) -> str:
    values = m.scores(group)
    if not values:
        return "not run" if not group else "diverged"
    mean, std = m.mean_std(values)
    count = "" if len(values) == expected else f" ({len(values)}/{expected})"
    spread = f" ± {std:.1f}" if len(values) > 1 else ""  # one seed has no spread to show
    return f"{mean:.1f}{spread}{count}"


def commands(setting: str) -> str:
    return f"Runs: `{RUN} --setting {setting}`; table: `{REPORT}`."


def score_table(runs: dict, setting: str) -> list[str]:
    expected = len(grid.SEEDS[setting])
    methods = list(grid.METHODS.values())
    lines = [
        "| task (metric) | " + " | ".join(x.label for x in methods) + " | majority class |",
        "|---" * (len(methods) + 2) + "|",
    ]
    for task in grid.SETTINGS[setting]:
        groups = [runs.get((setting, task.key, x.key), []) for x in methods]
        texts = [cell_text(g, expected) for g in groups]
        means = [m.mean_std(m.scores(g)) for g in groups]
        best = max((mu for mu, _ in filter(None, means)), default=None)
        texts = [
            f"**{t}**" if mu and best is not None and mu[0] == best else t for t, mu in zip(texts, means, strict=True)
        ]
        some = next((r for g in groups for r in g), None)
        label = f"{task.label} ({some['metric']})" if some else task.label
        base = fmt(m.majority(some)) if some else "–"
        lines.append(f"| {label} | " + " | ".join(texts) + f" | {base} |")
    return lines


def parameter_table(runs: dict) -> list[str]:
    lines = [
        "| method | settings on e5-small | trainable (method) | % of the model | % of the encoder layers "
        "| task head |",
        "|---|---|---|---|---|---|",
    ]
    for method in grid.METHODS.values():
        found = [r for (_, _, key), g in runs.items() if key == method.key for r in g if r.get("parameters")]
        if not found:
            lines.append(f"| {method.label} | not run | | | | |")
            continue
        p = found[0]["parameters"]
        settings = found[0].get("method_settings") or {}
        size = {k: v for k, v in settings.items() if k in ("num_units", "num_prompts", "num_virtual_tokens", "r")}
        heads = sorted({r["parameters"]["head_trainable"] for r in found})
        head = f"{heads[0]:,}" if len(heads) == 1 else f"{heads[0]:,} to {heads[-1]:,}"
        layers = f"{p['method_percent_of_layers']:.2f}%" if method.key != "finetune" else "100% (+ the embeddings)"
        lines.append(
            f"| {method.label} | {', '.join(f'{k}={v}' for k, v in size.items()) or '–'} | "
            f"{p['method_trainable']:,} | {p['method_percent_of_model']:.2f}% | {layers} | {head} |"
        )
    return lines


def convergence_table(runs: dict) -> list[str]:
    """Per task and P-tuning v2 variant: mean steps (and seconds) to converge of both, and their ratios."""
    lines = [
        "| setting | task | baseline | seed pairs | FL steps | baseline steps | steps ratio (baseline / FL) | FL s "
        "| baseline s | seconds ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, tasks in grid.SETTINGS.items():
        for task in tasks:
            for key, label in BASELINES.items():
                fl, other = runs.get((setting, task.key, "fl"), []), runs.get((setting, task.key, key), [])
                r = m.convergence_ratio(fl, other)
                if not r:
                    continue
                sec = r["seconds"]
                sec_text = " | ".join([fmt(sec[0], 0), fmt(sec[1], 0), fmt(sec[2], 2)]) if sec else "– | – | –"
                lines.append(
                    f"| {grid.SETTING_LABELS[setting]} | {task.label} | {label} | {r['pairs']} | "
                    f"{r['fl_steps']:.0f} | {r['other_steps']:.0f} | {r['ratio']:.2f} | {sec_text} |"
                )
    if len(lines) == 2:
        return ["No task has a seed on which both FL-tuning and a P-tuning v2 variant learned yet."]
    return lines


def stability_table(runs: dict) -> list[str]:
    methods = list(grid.METHODS.values())
    lines = [
        "| setting | task | " + " | ".join(f"{x.label} std" for x in methods) + " |",
        "|---" * (len(methods) + 2) + "|",
    ]
    for setting, tasks in grid.SETTINGS.items():
        for task in tasks:
            stds = [m.mean_std(m.scores(runs.get((setting, task.key, x.key), []))) for x in methods]
            if not any(stds):
                continue
            texts = [
                fmt(s[1]) if s and len(m.scores(runs[(setting, task.key, x.key)])) > 1 else "–"
                for s, x in zip(stds, methods, strict=True)
            ]
            lines.append(f"| {grid.SETTING_LABELS[setting]} | {task.label} | " + " | ".join(texts) + " |")
    lines += ["", "| setting | tasks | " + " | ".join(f"{x.label}: fail / runs" for x in methods) + " |"]
    lines.append("|---" * (len(methods) + 2) + "|")
    ranking = set(ranking_tasks(runs))
    for setting in grid.SETTINGS:
        ranked = sum(s == setting for s, _ in ranking)
        for label, only in (("all", None), (f"the {ranked} that rank methods", ranking)):
            cells = []
            for x in methods:
                group = [
                    r
                    for (s, t, k), g in runs.items()
                    if s == setting and k == x.key and (only is None or (s, t) in only)
                    for r in g
                ]
                cells.append(f"{sum(m.fails(r) for r in group)} / {len(group)}" if group else "–")
            lines.append(f"| {grid.SETTING_LABELS[setting]} | {label} | " + " | ".join(cells) + " |")
    return lines


def bert_base_share() -> str:
    """FL-tuning's k=160 count on Chinese BERT-base's shape (vocabulary 21,128), built on the meta device."""
    import torch
    from transformers import AutoModel, BertConfig

    from fltuning.methods.base import build_method
    from fltuning.methods.budget import count_on_meta

    config = BertConfig(vocab_size=21128)
    count = count_on_meta(config, build_method("fl", num_units=grid.FL_UNITS))
    with torch.device("meta"):
        named = list(AutoModel.from_config(config).named_parameters())
    total = sum(p.numel() for _, p in named)
    layers = sum(p.numel() for n, p in named if "embed" not in n)
    return f"{count:,} parameters: {100 * count / total:.2f}% of the model, {100 * count / layers:.2f}% of its layers"


def setup_lines() -> list[str]:
    lines = [
        "| setting | task | base config | epochs | batch x accum | FL / P-tuning v2 LR | changes for this benchmark |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, tasks in grid.SETTINGS.items():
        for task in tasks:
            s = grid.cell_settings(grid.Cell(setting, task, grid.METHODS["fl"], 0))
            _, source = grid.base_settings(task)
            lines.append(
                f"| {grid.SETTING_LABELS[setting]} | {task.label} | `{source}` | {s.get('train.epochs')} | "
                f"{s.get('train.batch_size')} x {s.get('train.grad_accum', 1)} | {s.get('train.lr')} | "
                f"{task.why or 'none'} |"
            )
    lines += ["", "| method | what it trains and why |", "|---|---|"]
    lines += [f"| {x.label} | {x.why} |" for x in grid.METHODS.values()]
    return lines


def final_loss(group: list[dict]) -> float | None:
    """Mean over runs of the last logged training loss."""
    losses = [r["train_loss"][-1]["loss"] for r in group if r.get("train_loss")]
    return sum(losses) / len(losses) if losses else None


def observations(runs: dict) -> list[str]:
    """Computed remarks: tasks where no method gets clear of the majority class, with the training losses that say
    whether the methods fit their training set at all."""
    lines = []
    for setting, tasks in grid.SETTINGS.items():
        for task in tasks:
            groups = {key: runs.get((setting, task.key, key), []) for key in grid.METHODS}
            means = {key: m.mean_std(m.scores(g)) for key, g in groups.items() if m.scores(g)}
            if len(means) < 2:
                continue
            base = m.majority(next(r for g in groups.values() for r in g))
            if m.separates(list(groups.values())):
                continue
            losses = ", ".join(
                f"{grid.METHODS[key].label} {final_loss(groups[key]):.2f}"
                for key in means
                if final_loss(groups[key]) is not None
            )
            lines.append(
                f"- {grid.SETTING_LABELS[setting]} {task.label}: no method is more than {m.CHANCE_MARGIN} points "
                f"above the majority class ({base:.1f}) on test, so this task does not separate the methods. "
                f"Final training loss, mean over runs: {losses}."
            )
    return lines or ["- Every task with two or more methods run has a method clear of the majority class."]


def changed_settings(run: dict) -> list[str]:
    """The train and data settings of ``run`` that differ from what the grid now gives its cell (paths, split and
    seed aside), e.g. ``train.head_lr=0.003``; a setting the run does not have reads ``unset``."""
    from fltuning.train.config import RunConfig

    cell = grid.Cell(run["setting"], grid.find_task(run["setting"], run["task"]), grid.METHODS[run["method"]], 0)
    expected, defaults = grid.cell_settings(cell), RunConfig().to_dict()
    changed = []
    for section in ("train", "data"):
        recorded = run["config"][section]
        for key in sorted(set(recorded) | {k.partition(".")[2] for k in expected if k.startswith(f"{section}.")}):
            if key in ("seed", "split", "data_dir") or key.endswith("_file"):
                continue
            value = recorded.get(key)
            if value != expected.get(f"{section}.{key}", defaults[section].get(key)):
                changed.append(f"{section}.{key}={'unset' if value is None else value}")
    return changed


# Folders of runs outside the grid: what each holds, and the command that makes one.
OUTSIDE = {
    "diagnostics": (
        "diagnostic",
        "a grid cell made with changed settings to explain a result: "
        f"`{RUN} --setting S --tasks T --methods M --seeds K --set KEY=VALUE --runs-dir "
        "benchmarks/paper/diagnostics/NAME --work-dir SCRATCH/NAME` (a folder per investigation)",
    ),
    "superseded": (
        "superseded",
        "a grid cell made under settings the grid has since changed, kept as the evidence for the change (each "
        "change is explained where it is made in `benchmarks/paper/grid.py`)",
    ),
}


def outside_lines(outside: dict[str, dict], runs: dict) -> list[str]:
    """One row per (folder, cell, changed settings): the seeds, their mean test score, and the mean of the grid's
    own runs on the same seeds."""
    if not any(outside.values()):
        return []
    lines = ["## Runs outside the grid", ""]
    lines += [f"- `benchmarks/paper/{name}/`: {OUTSIDE[name][1]}." for name, found in outside.items() if found]
    lines += [
        "",
        "| kind | setting | task | method | settings that differ from the grid's | seeds | test | the grid's runs, "
        "same seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, groups in outside.items():
        rows: dict[tuple, list[dict]] = {}
        for key, group in sorted(groups.items()):
            for run in group:
                rows.setdefault((*key, ", ".join(changed_settings(run)) or "-"), []).append(run)
        for (setting, task_key, method_key, changed), group in rows.items():
            seeds = [r["seed"] for r in group]
            same = [r for r in runs.get((setting, task_key, method_key), []) if r["seed"] in seeds]
            grid_text = "not run" if not same else fmt(mean_score(same))
            if same and len(same) < len(seeds):
                grid_text += f" ({len(same)} of the seeds)"
            lines.append(
                f"| {OUTSIDE[name][0]} | {grid.SETTING_LABELS[setting]} | {grid.find_task(setting, task_key).label} "
                f"| {grid.METHODS[method_key].label} | {changed} | {', '.join(map(str, seeds))} "
                f"| {fmt(mean_score(group))} | {grid_text} |"
            )
    return [*lines, ""]


def build_report(runs_dir: Path, out: Path, img_dir: Path, outside_dir: Path | None = None) -> str:
    runs = m.load_runs(runs_dir)
    rel = Path(os.path.relpath(img_dir, out.parent))
    n_runs = sum(len(g) for g in runs.values())
    planned = sum(len(grid.cells(s)) for s in grid.SETTINGS)
    devices = sorted({r["device"] for g in runs.values() for r in g if r.get("device")})
    hardware = Counter(r["hardware"] for g in runs.values() for r in g if r.get("hardware"))
    page = [
        "# Results: FL-tuning against P-tuning v2, prompt tuning, LoRA and full fine-tuning on Chinese data",
        "",
        f"Generated by `{REPORT}` from the run files in `benchmarks/paper/runs/` ({n_runs} of {planned} planned "
        f"runs finished, on {', '.join(devices) or 'no device yet'}); do not edit by hand. Last generated "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}.",
        "",
        "Model: e5-small (multilingual E5 small, 12 layers, hidden 384, FFN 1536; 118M parameters, 96M of them the "
        "embedding matrix), not the paper's Chinese RoBERTa/NEZHA/RoFormer base models. Every score is on examples "
        "used neither to train nor to choose the checkpoint (FewCLUE's labelled test_public, or a held-out part "
        "drawn once; see Setup). Scores are points (0-100): mean ± standard deviation over seeds, `(k/n)` when "
        "only k of the n seeds have run. The paper's tables are not available: the comparison is with the numbers "
        "in its abstract.",
        "",
        "Runs on `cuda` were made on a lent GPU (torch 2.11 with CUDA 13, up to 14 runs at once): an NVIDIA H200 "
        "for those finished on 2026-11-26, an H100 for those finished on 2026-11-27; those finished before "
        "2026-11-26 03:00 UTC used a copy of e5-small whose unused vocabulary rows are zero (the same outputs for "
        "every input these tasks contain), later ones the complete model. Runs on `cpu` ran on 2 CPU cores, one "
        "at a time with 2 threads or two at a time with 1 thread each. Each run file names its device and "
        "finishing time, later ones also the hardware and thread count"
        + (f" ({', '.join(f'{name}: {n}' for name, n in sorted(hardware.items()))})" if hardware else "")
        + "; convergence in seconds only compares runs on the same kind of device, and on the same hardware and "
        "thread count where both runs record it.",
        "",
        "## The paper's claims, side by side",
        "",
        f"All tables: `{REPORT}` after `{RUN} --setting fewshot` and `{RUN} --setting full`.",
        "",
        "| claim (abstract) | paper | measured here | verdict | why / how measured |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in claim_rows(runs, bert_base_share())),
        "",
        "Where every method is at chance (these tasks are left out of the comparative claims above):",
        "",
        *observations(runs),
        "",
        "The LR of FL-tuning and of P-tuning v2 at FL's LR is the paper's task LR but at least "
        f"{grid.MIN_TASK_LR:g}: the paper's LRs were set for 10-100x more updates than these runs have, and at "
        "TNEWS's 5e-5 FL-tuning stayed at chance (details in Setup and `benchmarks/paper/grid.py`).",
        "",
    ]
    for setting in grid.SETTINGS:
        page += [
            f"## {grid.SETTING_LABELS[setting]}: test scores",
            "",
            commands(setting),
            "",
            *score_table(runs, setting),
            "",
        ]
        spread = img_dir / f"spread-{setting}.png"
        if spread_png(runs, setting, list(grid.SETTINGS[setting]), spread):
            page += [f"![spread over seeds, {setting}]({rel / spread.name})", ""]
    page += [
        "## Trainable parameters",
        "",
        f"From the run files (`{REPORT}`); the head's count depends on the task.",
        "",
        *parameter_table(runs),
        "",
        "## Convergence: FL-tuning against P-tuning v2",
        "",
        "Optimisation steps (and training seconds, evaluation included) until the dev score first reaches 95% "
        "of the run's own best, for the seeds where both runs learned (test score at least 1 point above the "
        "majority class; a run at chance 'converges' at its first evaluation). "
        f"`{REPORT}`.",
        "",
        *convergence_table(runs),
        "",
        f"The claims table gives the geometric mean of the step ratios over tasks (paper: about {SPEEDUP}x).",
        "",
        "## Stability",
        "",
        f"Standard deviation of the test score over seeds, and runs whose test score does not beat the majority "
        f"class (or that diverged), over all tasks and over the tasks that rank methods (some method more than "
        f"{m.CHANCE_MARGIN} points above the majority class; on the others every run is at chance). `{REPORT}`.",
        "",
        *stability_table(runs),
        "",
        "## Dev learning curves",
        "",
        "Mean dev score over seeds per method; the band spans the seeds' minimum to maximum.",
        "",
    ]
    for setting, tasks in grid.SETTINGS.items():
        for task in tasks:
            png = img_dir / f"curves-{setting}-{task.key}.png"
            if curves_png(runs, setting, task, png):
                page += [f"![{task.label} {setting}]({rel / png.name})", ""]
    if outside_dir is not None:
        page += outside_lines({name: m.load_runs(outside_dir / name) for name in OUTSIDE}, runs)
    page += ["## Setup", "", f"From `benchmarks/paper/grid.py` (`{REPORT}`).", "", *setup_lines(), ""]
    text = "\n".join(page)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    parser.add_argument("--out", type=Path, default=grid.ROOT / "docs" / "results.md")
    parser.add_argument("--img-dir", type=Path, help="default: img/ next to --out")
    parser.add_argument(
        "--outside-dir", type=Path, default=OUTSIDE_DIR, help="the folder of diagnostics/ and superseded/"
    )
    args = parser.parse_args(argv)
    build_report(args.runs_dir, args.out, args.img_dir or args.out.parent / "img", args.outside_dir)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
