"""The paper-comparison harness (benchmarks/paper) end to end on a tiny model and a real slice of FewCLUE CLUEWSC:
run JSONs with the numbers the report relies on, skip on restart, and the report with its plots."""

from __future__ import annotations

import json
import runpy
import statistics
import sys
from pathlib import Path

import pytest

PAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "paper"
MODULES = ("grid", "splits", "measures", "claims", "plots", "tiny")


@pytest.fixture
def paper_path(monkeypatch):
    """benchmarks/paper on sys.path, with its module names free of any other benchmark's same-named modules."""
    monkeypatch.syspath_prepend(str(PAPER))
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)


def run_script(monkeypatch, script: str, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(PAPER / script), run_name="__main__")
    return done.value.code


def test_harness_runs_skips_finished_cells_and_reports(paper_path, monkeypatch, tmp_path, data_dir, capsys):
    runs, work = tmp_path / "runs", tmp_path / "work"
    args = ["--tiny", "--tasks", "cluewsc", "--methods", "fl", "ptuning_v2", "--seeds", "0", "1"]
    args += ["--runs-dir", str(runs), "--work-dir", str(work), "--data-dir", str(data_dir), "--threads", "1"]
    args += ["--set", "data.max_train_examples=8"]  # one update per epoch: two epochs, two dev evaluations
    assert run_script(monkeypatch, "run.py", *args) == 0

    files = sorted(runs.glob("fewshot/cluewsc/*/seed*.json"))
    assert [f.relative_to(runs).as_posix() for f in files] == [
        f"fewshot/cluewsc/{m}/seed{s}.json" for m in ("fl", "ptuning_v2") for s in (0, 1)
    ]
    for path in files:
        run = json.loads(path.read_text())
        assert run["status"] == "finished" and run["metric"] == "accuracy" and run["device"] == "cpu"
        assert run["hardware"].endswith(", 1 thread")  # --threads 1: the timings' context
        assert run["config"]["data"]["split"] == run["seed"] == run["config"]["train"]["seed"]
        assert [p["step"] for p in run["curve"]] == [1, 2]
        assert all(p["seconds"] >= 0 for p in run["curve"])
        # the best checkpoint is the first best dev evaluation, and re-scoring it gives the logged score
        scores = [p["accuracy"] for p in run["curve"]]
        assert run["best_step"] == run["curve"][scores.index(max(scores))]["step"]
        assert run["dev"]["accuracy"] == pytest.approx(max(scores))
        assert 0.0 <= run["test"]["accuracy"] <= 1.0 and 0.0 < run["majority"]["test"] < 1.0
        assert run["versions"]["fltuning"] and run["wall_seconds"] > 0
        folder = work / "tiny-runs" / "fewshot" / "cluewsc" / run["method"] / f"seed{run['seed']}"
        assert (folder / "results.json").is_file() and not (folder / "checkpoints").exists()
    fl = json.loads(files[0].read_text())["parameters"]["method_trainable"]
    pt = json.loads(files[2].read_text())["parameters"]["method_trainable"]
    assert fl == 2 * (32 * 160 + 160 + 160 * 32 + 32)  # 2 layers, hidden 32, k=160 units with both biases
    assert abs(pt - fl) <= 0.05 * fl  # P-tuning v2 is budget-matched to FL-tuning

    stamps = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()
    assert run_script(monkeypatch, "run.py", *args) == 0
    assert "4 done, 0 to run" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # a JSON lost while its finished run folder stays is recorded again from the folder, with the wall time it took
    first = json.loads(files[0].read_text())
    files[0].unlink()
    assert run_script(monkeypatch, "run.py", *args) == 0
    again = json.loads(files[0].read_text())
    assert again["test"] == first["test"] and again["steps"] == first["steps"]
    assert first["wall_seconds"] <= again["wall_seconds"] < first["wall_seconds"] + 5

    # a diagnostic run: the grid's cell made with another setting, reported beside the grid's own run
    diagnostics = tmp_path / "diagnostics" / "head-lr" / "fewshot" / "cluewsc" / "fl"  # a folder per investigation
    diagnostics.mkdir(parents=True)
    changed = json.loads(files[0].read_text())
    changed["config"]["train"]["head_lr"] = 0.003
    (diagnostics / "seed0.json").write_text(json.dumps(changed))
    # a superseded run: made before the grid set a setting it now sets (the run's config lacks it)
    old = json.loads(files[0].read_text())
    del old["config"]["train"]["epochs"]
    superseded = tmp_path / "superseded" / "fewshot" / "cluewsc" / "fl"
    superseded.mkdir(parents=True)
    (superseded / "seed0.json").write_text(json.dumps(old))

    out = tmp_path / "docs" / "results.md"
    report = ["--runs-dir", str(runs), "--out", str(out), "--outside-dir", str(tmp_path)]
    assert run_script(monkeypatch, "report.py", *report) == 0
    text = out.read_text()
    assert "| CLUEWSC2020 (accuracy) |" in text and "(2/5)" in text and "not run" in text
    row = next(line for line in text.splitlines() if "train.head_lr=0.003" in line)
    score = f"{100 * changed['test']['accuracy']:.1f}"
    assert row.startswith("| diagnostic | Few-shot | CLUEWSC2020 | FL-tuning")
    assert row.endswith(f"| 0 | {score} | {score} |")
    row = next(line for line in text.splitlines() if line.startswith("| superseded |"))
    assert "| train.epochs=unset, " in row and row.endswith(f"| 0 | {score} | {score} |")
    for png in ("curves-fewshot-cluewsc.png", "spread-fewshot.png"):
        assert (out.parent / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(img/{png})" in text


def test_a_claimed_cell_is_refused_to_other_workers_until_released(paper_path, tmp_path):
    run = runpy.run_path(str(PAPER / "run.py"))
    grid = run["grid"]
    cell = grid.Cell("fewshot", grid.find_task("fewshot", "cluewsc"), grid.METHODS["fl"], 0)
    claims = tmp_path / "claims"
    assert run["claim"](claims, cell) and not run["claim"](claims, cell)
    run["release"](claims, cell)  # a run stopped by its budget: the next worker sharing the folder resumes it
    assert run["claim"](claims, cell)
    assert run["claim"](None, cell) and run["claim"](None, cell)  # no shared folder: every worker runs every cell


def test_the_eta_rescales_an_untimed_methods_task_runs_and_takes_off_what_a_stopped_run_spent(paper_path, tmp_path):
    run = runpy.run_path(str(PAPER / "run.py"))
    grid = run["grid"]

    def timed(task, method, seconds, device="cpu"):
        return {"setting": "fewshot", "task": task, "method": method, "device": device, "wall_seconds": seconds}

    # elsewhere on CPU full fine-tuning takes twice FL-tuning's time; a GPU run says nothing about CPU speeds
    done = [timed("tnews", "fl", 100), timed("tnews", "finetune", 200), timed("iflytek", "fl", 30)]
    done += [timed("iflytek", "finetune", 60), timed("iflytek", "finetune", 60), timed("csl", "finetune", 5, "cuda")]
    done += [timed("csl", "fl", 50)]
    csl = grid.find_task("fewshot", "csl")
    estimate = run["estimate_seconds"]
    speeds = run["method_speeds"]([r for r in done if r["device"] == "cpu"])
    assert speeds == pytest.approx({"fl": 2 / 3, "finetune": 4 / 3})
    assert estimate(grid.Cell("fewshot", csl, grid.METHODS["finetune"], 0), done) == pytest.approx(100)
    assert estimate(grid.Cell("fewshot", csl, grid.METHODS["fl"], 1), done) == pytest.approx(50)  # its own time
    assert estimate(grid.Cell("fewshot", csl, grid.METHODS["lora"], 0), done) == pytest.approx(75)  # never timed
    cmrc = grid.find_task("fewshot", "cmrc2018")  # nothing of the task timed here: the grid's guess
    assert estimate(grid.Cell("fewshot", cmrc, grid.METHODS["fl"], 0), done) == cmrc.minutes * 60
    stopped = tmp_path / "stopped"  # a run stopped by its budget after 30 s: what is left of it
    stopped.mkdir()
    (stopped / "wall_seconds.txt").write_text("30.0\n")
    cell = grid.Cell("fewshot", csl, grid.METHODS["finetune"], 0)
    assert run["seconds_left"](cell, done, "cpu", stopped) == pytest.approx(70)
    assert run["seconds_left"](cell, done, "cpu", tmp_path / "never-started") == pytest.approx(100)


def test_a_resumed_run_is_timed_at_its_own_pace_for_the_steps_its_cell_takes(paper_path, tmp_path):
    from fltuning.train.checkpoint import CHECKPOINTS, MANIFEST, checkpoint_name

    run = runpy.run_path(str(PAPER / "run.py"))
    grid = run["grid"]
    csl = grid.find_task("fewshot", "csl")
    cell = grid.Cell("fewshot", csl, grid.METHODS["fl"], 2)
    # seed 0 took 100 steps in 50 s on a fast machine; here 30 steps took 300 s: 70 steps left at 10 s a step
    done = [{"setting": "fewshot", "task": "csl", "method": "fl", "device": "cpu", "wall_seconds": 50, "steps": 100}]
    stopped = tmp_path / "stopped"
    saved = stopped / CHECKPOINTS / checkpoint_name(30)
    saved.mkdir(parents=True)
    (stopped / "wall_seconds.txt").write_text("300.0\n")
    (saved / "optimizer.json").write_text("{}")
    (saved / MANIFEST).write_text('{"files": {"optimizer.json": 2}}')
    assert run["seconds_left"](cell, done, "cpu", stopped) == pytest.approx(700)
    (saved / MANIFEST).unlink()  # a half-written checkpoint does not count: the estimate less what was spent
    assert run["seconds_left"](cell, done, "cpu", stopped) == 0.0


def test_drawn_parts_are_disjoint_reproducible_and_in_file_order(paper_path):
    from splits import draw

    parts = draw(100, {"train": 10, "dev": 10, "test": None}, seed=3)
    assert [len(p) for p in parts.values()] == [10, 10, 80]
    assert set().union(*parts.values()) == set(range(100))
    assert all(p == sorted(p) for p in parts.values())
    assert parts == draw(100, {"train": 10, "dev": 10, "test": None}, seed=3)
    assert parts["train"] != draw(100, {"train": 10, "dev": 10, "test": None}, seed=4)["train"]
    with pytest.raises(ValueError, match="cannot draw 30 units from a file of 20"):
        draw(20, {"train": 15, "dev": 15}, seed=0)


def test_convergence_is_steps_to_95_percent_of_the_runs_own_best(paper_path):
    from measures import convergence_ratio, time_to_converge

    def run(seed, values, test=0.8):
        curve = [{"step": 10 * (i + 1), "seconds": 2.0 * (i + 1), "accuracy": v} for i, v in enumerate(values)]
        return {"seed": seed, "status": "finished", "metric": "accuracy", "percent": True, "curve": curve,
                "test": {"accuracy": test}, "majority": {"dev": 0.5, "test": 0.5}, "device": "cpu"}  # fmt: skip

    fl = run(0, [0.5, 0.78, 0.8, 0.7])  # best 80: 95% is 76, first reached at step 20
    pt = run(0, [0.5, 0.6, 0.7, 0.8])  # best 80: reached at step 40
    assert time_to_converge(fl) == (20, 4.0) and time_to_converge(pt) == (40, 8.0)
    ratio = convergence_ratio([fl], [pt])
    assert ratio["ratio"] == 2.0 and ratio["seconds"] == (4.0, 8.0, 2.0)
    one_thread, two_threads = dict(fl, hardware="Xeon, 1 thread"), dict(pt, hardware="Xeon, 2 threads")
    assert convergence_ratio([one_thread], [two_threads]) == dict(ratio, seconds=None)  # steps compare, seconds not
    assert convergence_ratio([one_thread], [pt])["seconds"] == (4.0, 8.0, 2.0)  # one side unrecorded: device decides
    assert time_to_converge(run(0, [0.5, 0.8], test=0.505)) is None  # at chance on test: nothing converged


def test_gaps_between_methods_pair_seeds_and_need_two_for_a_verdict(paper_path):
    from claims import gap_text, gap_verdict
    from measures import paired_difference

    def run(seed, test, status="finished"):
        return {"seed": seed, "status": status, "metric": "f1", "percent": True, "test": {"f1": test}}

    fl = [run(0, 0.50), run(1, 0.60), run(2, 0.90)]  # seed 2 has no partner: it must not lift FL's side
    pt = [run(0, 0.40), run(1, 0.45), run(3, 0.10), run(4, 0.2, status="diverged")]
    gap, se, n = paired_difference(fl, pt)
    assert n == 2 and gap == pytest.approx(12.5) and se == pytest.approx(2.5)
    assert gap_verdict((gap, se, n)) == "reproduced" and gap_text((gap, se, n)) == "+12.5 ± 2.5 (2 seeds)"
    one = paired_difference(fl[:1], pt)
    assert one[2] == 1 and gap_verdict(one) == "same sign, within noise" and gap_text(one) == "+10.0 (1 seed)"
    assert paired_difference(fl[2:], pt) is None and gap_verdict(None).startswith("pending")
    assert gap_verdict(paired_difference(pt[:2], fl)) == "not reproduced"


def test_a_smaller_std_counts_as_more_stable_only_beyond_seed_noise(paper_path):
    from measures import spread_lower

    steady, noisy = [50.0, 50.5, 49.5, 50.2, 49.8], [45.0, 55.0, 40.0, 60.0, 50.0]
    assert spread_lower(steady, noisy) and not spread_lower(noisy, steady)
    # stds 1.22 and 1.23, as close as FL's and P-tuning v2's (5e-3) on few-shot CLUENER: lower by a hair is not lower
    hair, other = [53.5, 55.0, 56.9, 54.8, 55.2], [44.0, 45.3, 47.4, 45.1, 45.6]
    assert statistics.stdev(hair) < statistics.stdev(other) and not spread_lower(hair, other)
    assert spread_lower([50.0, 50.0, 50.0], [40.0, 50.0, 60.0]) and not spread_lower([50.0, 50.0], [50.0, 50.0])


def accuracy_runs(scores: list[float], majority: float = 0.5) -> list[dict]:
    """Finished accuracy runs, one per seed, with the majority-class score ``majority``."""
    return [{"seed": s, "status": "finished", "metric": "accuracy", "percent": True, "test": {"accuracy": v},
             "majority": {"test": majority}} for s, v in enumerate(scores)]  # fmt: skip


def test_stability_counts_spreads_and_failures_only_on_tasks_that_rank_methods(paper_path):
    from claims import stability

    grid = {  # TNEWS ranks methods (FL steady, P-tuning v2 all over the place); CSL has every run at chance
        ("fewshot", "tnews", "fl"): accuracy_runs([0.80, 0.81, 0.79, 0.80, 0.45]),
        ("fewshot", "tnews", "ptuning_v2"): accuracy_runs([0.40, 0.90, 0.20, 0.70, 0.60]),
        ("fewshot", "csl", "fl"): accuracy_runs([0.50, 0.50, 0.49]),
        ("fewshot", "csl", "ptuning_v2"): accuracy_runs([0.50, 0.50, 0.49]),
    }
    lower, total, fails = stability(grid, "ptuning_v2")
    assert (lower, total) == (0, 1)  # FL's one failed split makes its spread no lower beyond noise
    assert fails == "runs not beating the majority class: FL 1/5, it 2/5"  # CSL's 6 chance runs left out
    grid[("fewshot", "tnews", "fl")] = accuracy_runs([0.80, 0.81, 0.79, 0.80, 0.82])
    assert stability(grid, "ptuning_v2")[:2] == (1, 1)


def test_task_wins_count_the_tasks_whose_gap_rests_on_one_seed(paper_path):
    from claims import wins

    grid = {  # TNEWS: 3 shared seeds, FL ahead; IFLYTEK: FL ahead on its one seed; CHID: P-tuning v2 ahead on one
        ("fewshot", "tnews", "fl"): accuracy_runs([0.50, 0.52, 0.51], 0.1),
        ("fewshot", "tnews", "ptuning_v2"): accuracy_runs([0.40, 0.41, 0.42], 0.1),
        ("fewshot", "iflytek", "fl"): accuracy_runs([0.30], 0.1),
        ("fewshot", "iflytek", "ptuning_v2"): accuracy_runs([0.20, 0.25], 0.1),
        ("fewshot", "chid", "fl"): accuracy_runs([0.20], 0.1),
        ("fewshot", "chid", "ptuning_v2"): accuracy_runs([0.30], 0.1),
    }
    assert wins(grid, "fl", "ptuning_v2") == (2, 3, 2)


def test_cell_settings_layer_the_task_lr_floor_methods_and_per_task_method_changes(paper_path):
    import grid

    def settings(setting, task, method, seed=0):
        return grid.cell_settings(grid.Cell(setting, grid.find_task(setting, task), grid.METHODS[method], seed))

    fl, finetune = settings("full", "cluener2020", "fl"), settings("full", "cluener2020", "finetune")
    assert fl["train.lr"] == grid.MIN_TASK_LR and "train.head_lr" not in fl  # the paper's 1e-4, floored
    assert (finetune["train.lr"], finetune["train.head_lr"]) == (3e-5, grid.MIN_TASK_LR)  # the pointer head
    assert "train.head_lr" not in settings("fewshot", "tnews", "finetune")
    few = settings("fewshot", "tnews", "ptuning_v2_lr", seed=3)
    assert (few["train.lr"], few["data.split"], few["train.seed"]) == (5e-3, 3, 3)


def test_a_run_stopped_by_its_budget_gives_its_claim_back_and_a_rerun_resumes_it(
    paper_path, monkeypatch, tmp_path, data_dir, capsys
):
    import fltuning.train.run as train_run

    real_train = train_run.train

    def stopped_after_first_step(config, callback):  # what the budget does once it is spent: ask for a stop
        def stop(event, trainer):
            callback(event, trainer)
            if event == "step":
                trainer.request_stop()

        return real_train(config, callback=stop)

    runs, claims = tmp_path / "runs", tmp_path / "claims"
    args = ["--tiny", "--tasks", "cluewsc", "--methods", "fl", "--seeds", "0", "--runs-dir", str(runs)]
    args += ["--work-dir", str(tmp_path / "work"), "--data-dir", str(data_dir), "--threads", "1"]
    args += ["--claim-dir", str(claims), "--set", "data.max_train_examples=8"]  # two epochs of one update each
    monkeypatch.setattr(train_run, "train", stopped_after_first_step)
    assert run_script(monkeypatch, "run.py", *args) == 0
    assert "stopped (budget spent" in capsys.readouterr().out
    result = runs / "fewshot" / "cluewsc" / "fl" / "seed0.json"
    assert not result.exists() and not any(claims.iterdir())  # nothing recorded, and the cell is free again

    steps = []

    def counting_steps(config, callback):
        return real_train(config, callback=lambda event, trainer: (steps.append(event), callback(event, trainer)))

    monkeypatch.setattr(train_run, "train", counting_steps)
    assert run_script(monkeypatch, "run.py", *args) == 0  # the same command, sharing the claim folder
    run = json.loads(result.read_text())
    assert run["status"] == "finished" and run["steps"] == 2
    assert steps.count("step") == 1  # resumed after step 1, neither restarted nor skipped
    assert [p["step"] for p in run["curve"]] == [1, 2]
