"""The training workflow (`fltune train` and `fltuning.train`) on a tiny BERT: it learns, resumes exactly, survives
crashes and failed saves, stops on a non-finite loss, and refuses bad input without writing anything."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fltuning.cli import main
from fltuning.train import checkpoint as ckpt
from fltuning.train.config import load_config
from fltuning.train.loop import TrainingDiverged, TrainingStopped, epoch_batches
from fltuning.train.run import train


def write_sentiment(folder: Path, sizes=(64, 32, 32)) -> dict[str, Path]:
    """A separable toy task: the label is whether the sentence holds 好 (pos) or 坏 (neg)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for seed, (part, n) in enumerate(zip(("train", "dev", "test"), sizes, strict=True)):
        rng = random.Random(seed)
        lines = []
        for i in range(n):
            label = rng.choice(["pos", "neg"])
            chars = [rng.choice("今天我们去公园看电影吃饭天气") for _ in range(rng.randint(4, 10))]
            chars.insert(rng.randint(0, len(chars)), "好" if label == "pos" else "坏")
            lines.append(json.dumps({"id": f"{part}-{i}", "text": "".join(chars), "label": label}, ensure_ascii=False))
        files[part] = folder / f"{part}.jsonl"
        files[part].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


@pytest.fixture
def sentiment(tmp_path) -> dict[str, Path]:
    return write_sentiment(tmp_path / "data")


def config_for(model_dir: Path, files: dict[str, Path], out: Path, **overrides):
    base = {
        "model.name": str(model_dir),
        "model.pooling": "mean",
        "data.task": "custom",
        "data.train_file": str(files["train"]),
        "data.dev_file": str(files["dev"]),
        "data.test_file": str(files["test"]),
        "method.num_units": 16,
        "train.epochs": 3,
        "train.batch_size": 8,
        "train.lr": 1e-2,
        "output.dir": str(out),
        "output.progress": False,
    }
    return load_config(None, base | overrides)


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "method_model.safetensors")) | {
        f"head.{k}": v for k, v in load_file(str(run / "adapter" / "head.safetensors")).items()
    }


def eval_lines(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def test_fl_training_learns_a_separable_task_and_fills_the_run_folder(tiny_model_dir, sentiment, tmp_path, one_thread):
    run = tmp_path / "run"
    results = train(config_for(tiny_model_dir, sentiment, run, **{"train.epochs": 10}))
    assert results["dev"]["accuracy"] >= 0.85 and results["test"]["accuracy"] >= 0.85
    for name in ("config.yaml", "run.json", "parameters.json", "metrics.jsonl", "results.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "parameters.json").read_text())
    # FL units: 2 layers x (2 * 32 * 16 + 16 + 32); the head: Linear(32, 2)
    assert report["method_trainable"] == 2 * (2 * 32 * 16 + 16 + 32) and report["head_trainable"] == 66
    evals = [line for line in eval_lines(run) if line["split"] == "dev"]
    assert len(evals) == 10 and results["best_step"] == max(evals, key=lambda e: e["accuracy"])["step"]
    # the best checkpoint's dev score is what the final model gets again
    assert results["dev"]["accuracy"] == max(e["accuracy"] for e in evals)
    # the submission file: one line per test example, in file order, with the predicted label
    submitted = [json.loads(line) for line in Path(results["prediction_file"]).read_text().splitlines()]
    gold = [json.loads(line) for line in sentiment["test"].read_text().splitlines()]
    assert [s["id"] for s in submitted] == [g["id"] for g in gold]
    hits = sum(s["label"] == g["label"] for s, g in zip(submitted, gold, strict=True))
    assert hits / len(gold) == results["test"]["accuracy"]
    # only the newest and the best checkpoints are kept
    steps = [step for step, _ in ckpt.list_checkpoints(run)]
    assert set(steps) <= {results["best_step"], results["steps"]} and results["steps"] in steps


def test_epoch_order_depends_only_on_seed_and_epoch_and_shards_cover_every_example():
    one = epoch_batches(10, 3, seed=1, epoch=2)
    assert one == epoch_batches(10, 3, seed=1, epoch=2) and one != epoch_batches(10, 3, seed=1, epoch=3)
    assert sorted(i for b in one for i in b) == list(range(10))
    shards = [epoch_batches(10, 3, seed=1, epoch=2, rank=r, world=4) for r in range(4)]
    assert len({len(s) for s in shards}) == 1  # every process takes the same number of steps
    assert {i for s in shards for b in s for i in b} == set(range(10))


RESUME = {"train.epochs": 3, "train.batch_size": 4, "train.grad_accum": 2, "train.eval_every": 3}


def test_resume_after_a_stop_or_a_crash_equals_an_uninterrupted_run(tiny_model_dir, sentiment, tmp_path, one_thread):
    full = tmp_path / "full"
    train(config_for(tiny_model_dir, sentiment, full, **RESUME))

    # 1. a requested stop (SIGINT / SIGTERM) mid-epoch, between evaluations: saves step 5 and raises
    stopped = tmp_path / "stopped"

    def stop_at_5(event, trainer):
        if event == "step" and trainer.position.step == 5:
            trainer.request_stop()

    with pytest.raises(TrainingStopped, match="--output.resume auto"):
        train(config_for(tiny_model_dir, sentiment, stopped, **RESUME), stop_at_5)
    assert ckpt.list_checkpoints(stopped)[-1][0] == 5
    train(config_for(tiny_model_dir, sentiment, stopped, **RESUME, **{"output.resume": "auto"}))

    # 2. a crash at step 8: the newest checkpoint is the evaluation at step 6
    crashed = tmp_path / "crashed"

    def crash_at_8(event, trainer):
        if event == "step" and trainer.position.step == 8:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config_for(tiny_model_dir, sentiment, crashed, **RESUME), crash_at_8)
    assert ckpt.list_checkpoints(crashed)[-1][0] == 6
    train(config_for(tiny_model_dir, sentiment, crashed, **RESUME, **{"output.resume": "auto"}))

    expected = adapter_tensors(full)
    for run in (stopped, crashed):
        got = adapter_tensors(run)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (run.name, name)
        assert eval_lines(run) == eval_lines(full)  # the same losses, learning rates and dev scores, logged once


def test_resumable_checkpoints_every_n_evaluations_and_best_only_ones_between(
    tiny_model_dir, sentiment, tmp_path, one_thread
):
    full = tmp_path / "full"
    train(config_for(tiny_model_dir, sentiment, full, **RESUME))
    every = RESUME | {"output.checkpoint_every": 3}
    run, seen = tmp_path / "every", []

    def crash_at_20(event, trainer):
        if event == "evaluate":
            seen.append({step: ckpt.is_resumable(folder) for step, folder in ckpt.list_checkpoints(trainer.run_dir)})
        if event == "step" and trainer.position.step == 20:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config_for(tiny_model_dir, sentiment, run, **every), crash_at_20)
    # evaluations at steps 3, 6, ..., 18: the 3rd and 6th (steps 9 and 18) are resumable, the first (always a new
    # best) is best-only, and the resumable one before the newest is rotated away unless it is the best
    assert seen[0] == {3: False}
    assert all(resumable == (step in (9, 18)) for state in seen for step, resumable in state.items())
    assert [step for step, _ in ckpt.list_checkpoints(run, resumable=True)] == [18]
    train(config_for(tiny_model_dir, sentiment, run, **every, **{"output.resume": "auto"}))
    expected, got = adapter_tensors(full), adapter_tensors(run)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert eval_lines(run) == eval_lines(full)


def test_a_failed_save_keeps_the_previous_checkpoint(tiny_model_dir, sentiment, tmp_path, monkeypatch, one_thread):
    run = tmp_path / "run"
    real_save = ckpt.save_tensors
    calls = {"n": 0}

    def disk_full_on_second_checkpoint(tensors, path):
        if path.name == "optimizer.safetensors":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_tensors", disk_full_on_second_checkpoint)
    with pytest.raises(OSError, match="No space"):
        train(config_for(tiny_model_dir, sentiment, run))
    assert [step for step, _ in ckpt.list_checkpoints(run)] == [8]  # epoch 1's checkpoint, complete
    assert not list((run / ckpt.CHECKPOINTS).glob(".tmp-*"))  # the half-written one is gone
    monkeypatch.setattr(ckpt, "save_tensors", real_save)
    results = train(config_for(tiny_model_dir, sentiment, run, **{"output.resume": "auto"}))
    assert results["steps"] == 24


def test_a_folder_without_its_manifest_is_never_resumed_from(tmp_path):
    def one_file(folder: Path) -> None:
        (folder / "a").write_text("x")

    root = tmp_path / ckpt.CHECKPOINTS
    good = ckpt.write_atomically(root / "step-0000002", one_file)
    partial = root / "step-0000004"
    partial.mkdir()
    (partial / "state.json").write_text("{}")
    truncated = ckpt.write_atomically(root / "step-0000006", one_file)
    (truncated / "a").write_text("")  # a size that disagrees with the manifest
    assert ckpt.list_checkpoints(tmp_path) == [(2, good)]


def test_rotation_keeps_the_newest_resumable_checkpoints_and_the_protected_ones(tmp_path):
    def checkpoint(step: int, resumable: bool) -> None:
        names = ["model.safetensors", "state.json"] + (["optimizer.json"] if resumable else [])
        ckpt.write_atomically(
            tmp_path / ckpt.CHECKPOINTS / ckpt.checkpoint_name(step),
            lambda folder: [(folder / name).write_text("{}") for name in names],
        )

    for step, resumable in ((1, True), (2, False), (3, True), (4, False), (5, True), (6, False)):
        checkpoint(step, resumable)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path, resumable=True)] == [1, 3, 5]
    ckpt.rotate(tmp_path, keep=2, protect={2, 6})  # best-only 4 goes; so does resumable 1, beyond the 2 newest
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3, 5, 6]
    ckpt.rotate(tmp_path, keep=0, protect={6})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6]


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, sentiment, tmp_path, monkeypatch, one_thread
):
    from fltuning.tasks.classification import ClassificationTask

    real_loss, seen = ClassificationTask.loss, {"n": 0}

    def nan_from_step_11(self, logits, batch):
        seen["n"] += 1
        loss = real_loss(self, logits, batch)
        return loss * float("nan") if seen["n"] == 11 else loss

    monkeypatch.setattr(ClassificationTask, "loss", nan_from_step_11)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="non-finite at step 11.*step-0000008"):
        train(config_for(tiny_model_dir, sentiment, run))
    diverged = json.loads((run / "diverged.json").read_text())
    assert diverged["step"] == 10 and diverged["what"] == "the training loss" and len(diverged["feature_indices"]) == 8
    assert [step for step, _ in ckpt.list_checkpoints(run)] == [8]
    assert not (run / "adapter").exists()


def cli(*args: str) -> int:
    return main(list(args))


def test_cli_exit_codes_for_bad_input_and_nothing_written(tiny_model_dir, sentiment, tmp_path, capsys):
    common = ["--model.name", str(tiny_model_dir), "--data.task", "custom", "--output.progress", "false"]
    files = ["--data.train_file", str(sentiment["train"]), "--data.dev_file", str(sentiment["dev"])]
    bad = tmp_path / "bad.jsonl"
    cases = {
        "bad JSON": ('{"text": "好", "label": "pos"}\n{"text": "坏", "label": \n', "bad.jsonl:2: not valid JSON"),
        "missing field": ('{"text": "好", "label": "pos"}\n{"label": "neg"}\n', "bad.jsonl:2"),
        "empty text": ('{"text": "好", "label": "pos"}\n{"text": "  ", "label": "neg"}\n', "bad.jsonl:2"),
    }
    for name, (content, message) in cases.items():
        bad.write_text(content, encoding="utf-8")
        out = tmp_path / f"run-{name}"
        code = cli("train", *common, *files[:2], "--data.dev_file", str(bad), "--output.dir", str(out))
        err = capsys.readouterr().err
        assert code == 2 and message in err, (name, err)
        assert not out.exists(), name
    # a dev label the training file does not have
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"text": "好", "label": "maybe"}\n', encoding="utf-8")
    code = cli("train", *common, *files[:2], "--data.dev_file", str(unknown), "--output.dir", str(tmp_path / "y"))
    assert code == 2 and "unknown.jsonl:1" in capsys.readouterr().err and not (tmp_path / "y").exists()
    # config mistakes name the flag
    for args, message in [
        (["--train.lrr", "1"], "unknown key train.lrr"),
        (["--train.epochs", "two"], "--train.epochs: expected int"),
        (["--method.name", "nope"], "unknown tuning method 'nope'"),
        (["--method.num_unit", "8"], "num_unit"),
        (["--data.task", "nope"], "unknown task 'nope'"),
        (["--output.resume", "sometimes"], "--output.resume"),
    ]:
        assert cli("train", *common, *files, *args, "--output.dir", str(tmp_path / "z")) == 2
        assert message in capsys.readouterr().err, args
        assert not (tmp_path / "z").exists()


def test_an_existing_run_is_never_overwritten(tiny_model_dir, sentiment, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    train(config_for(tiny_model_dir, sentiment, run, **{"train.epochs": 1}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = ["--model.name", str(tiny_model_dir), "--model.pooling", "mean", "--data.task", "custom"]
    args += ["--data.train_file", str(sentiment["train"]), "--data.dev_file", str(sentiment["dev"])]
    args += ["--data.test_file", str(sentiment["test"]), "--method.num_units", "16", "--train.epochs", "1"]
    args += ["--train.batch_size", "8", "--train.lr", "0.01", "--output.dir", str(run), "--output.progress", "false"]
    assert cli("train", *args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli("train", *args, "--output.resume", "auto", "--train.lr", "0.02") == 2
    assert "train.lr: 0.01 in the run, 0.02 now" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert cli("train", *args, "--output.resume", "auto") == 0  # finished: reports, changes nothing
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_evaluate_predict_and_export(tiny_model_dir, sentiment, tmp_path, capsys, one_thread):
    from transformers import AutoModel

    from fltuning.train.adapter import load_adapter
    from fltuning.train.inference import evaluate

    run = tmp_path / "run"
    results = train(config_for(tiny_model_dir, sentiment, run))
    assert evaluate(run, "dev") == results["dev"]
    assert evaluate(run / "adapter", "test", {"data.test_file": str(sentiment["test"])}) == results["test"]

    # predict: refuses to replace the file training wrote, writes elsewhere on request
    assert cli("predict", str(run)) == 2 and "exists" in capsys.readouterr().err
    out = tmp_path / "pred.json"
    assert cli("predict", str(run), "--input", str(sentiment["dev"]), "--output", str(out)) == 0
    assert len(out.read_text().splitlines()) == 32

    # export: the adapter folder, and a merged plain checkpoint whose outputs equal the adapter's
    assert cli("export", str(run), "--out", str(tmp_path / "adapter")) == 0
    assert (tmp_path / "adapter" / "method_model.safetensors").is_file()
    assert cli("export", str(run), "--out", str(tmp_path / "adapter")) == 2  # not into a non-empty folder
    capsys.readouterr()
    assert cli("export", str(run), "--out", str(tmp_path / "merged"), "--merged") == 0
    merged = AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.intermediate_size == 64 + 16
    model, *_ = load_adapter(run / "adapter")
    ids = torch.tensor([[2, 200, 300, 400, 3]])
    with torch.no_grad():
        expected = model.backbone(input_ids=ids).last_hidden_state
        torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_an_adapter_is_refused_by_a_model_of_another_shape(tiny_model_dir, sentiment, tmp_path, capsys, one_thread):
    from conftest import save_tiny_model

    run = tmp_path / "run"
    train(config_for(tiny_model_dir, sentiment, run, **{"train.epochs": 1}))
    other = save_tiny_model(tmp_path / "wider", hidden_size=48)
    assert cli("evaluate", str(run), "--model.name", str(other)) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "hidden_size 32 (adapter) vs 48 (model)" in err
    assert cli("evaluate", str(tmp_path)) == 2 and "neither a run folder nor an adapter" in capsys.readouterr().err


def test_budget_matching_and_other_methods_train(tiny_model_dir, sentiment, tmp_path, one_thread):
    from fltuning.methods.budget import fl_num_trainable
    from fltuning.train.build import backbone_config

    fl_count = fl_num_trainable(backbone_config(load_config(None, {"model.name": str(tiny_model_dir)}).model), 16)
    for method in ("ptuning_v2", "lora"):
        out = tmp_path / method
        overrides = {"method.name": method, "method.budget": "fl:16", "train.epochs": 1}
        config = config_for(tiny_model_dir, sentiment, out, **overrides)
        config.method.settings = {}
        results = train(config)
        trained = results["parameters"]["method_trainable"]
        assert abs(trained - fl_count) / fl_count < 0.2, (method, trained, fl_count)  # coarse steps at this size
    config = config_for(tiny_model_dir, sentiment, tmp_path / "pt", **{"method.name": "prompt_tuning"})
    config.method.settings = {"num_virtual_tokens": 4}
    assert train(config)["parameters"]["method_trainable"] == 4 * 32


def test_train_help_lists_every_key_with_type_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--train.lr (float, default: 0.0005)" in out
    assert "--output.resume (str, default: 'never')" in out
    assert "fl: num_units=160" in out and "ptuning_v2: num_prompts=160" in out


def test_print_config_shows_the_effective_values(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: fl\n  num_units: 64\ntrain:\n  lr: 3.0e-4\n")
    assert main(["train", "--config", str(path), "--train.epochs", "2", "--print-config"]) == 0
    printed = load_config_text(capsys.readouterr().out)
    assert printed["method"]["num_units"] == 64 and printed["train"]["lr"] == 3e-4 and printed["train"]["epochs"] == 2
    # another method on the command line leaves the file's FL settings behind; the same method keeps them
    assert main(["train", "--config", str(path), "--method.name", "lora", "--method.r", "4", "--print-config"]) == 0
    assert load_config_text(capsys.readouterr().out)["method"] == {"name": "lora", "budget": None, "r": 4}
    assert main(["train", "--config", str(path), "--method.name", "fl", "--print-config"]) == 0
    assert load_config_text(capsys.readouterr().out)["method"]["num_units"] == 64


def load_config_text(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_tensorboard_logging_when_asked(tiny_model_dir, sentiment, tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train(config_for(tiny_model_dir, sentiment, run, **{"train.epochs": 1, "output.tensorboard": True}))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_sigterm_and_sigint_ask_training_to_save_and_stop():
    import os
    import signal

    from fltuning.train.loop import _install_stop_handlers, _restore_handlers

    asked = []
    previous = _install_stop_handlers(lambda: asked.append(True))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    finally:
        _restore_handlers(previous)
    assert asked == [True, True]
    assert signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]


def test_cli_shortcuts_for_task_split_and_data_dir(capsys):
    assert main(["train", "--task", "fewclue/tnews", "--split", "1", "--data-dir", "/data", "--print-config"]) == 0
    data = load_config_text(capsys.readouterr().out)["data"]
    assert (data["task"], data["split"], data["data_dir"]) == ("fewclue/tnews", 1, "/data")


def test_head_lr_gives_the_task_head_its_own_rate(tiny_model_dir, sentiment, tmp_path, one_thread):
    from fltuning.train.config import RunConfigError
    from fltuning.train.loop import build_optimizer

    model = torch.nn.ModuleDict({"body": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 2)})
    plain = build_optimizer(model, 1e-3, 0.01, 1e-7)  # the two groups of every earlier checkpoint
    shape = [(len(g["params"]), g["weight_decay"], g["lr"]) for g in plain.param_groups]
    assert shape == [(2, 0.01, 1e-3), (2, 0.0, 1e-3)]
    split = build_optimizer(model, 1e-3, 0.01, 1e-7, head_lr=0.1)
    assert [(g["params"], g["weight_decay"], g["lr"]) for g in split.param_groups] == [
        ([model["body"].weight], 0.01, 1e-3),
        ([model["body"].bias], 0.0, 1e-3),
        ([model["head"].weight], 0.01, 0.1),
        ([model["head"].bias], 0.0, 0.1),
    ]
    # end to end: full fine-tuning whose backbone crawls while the head learns; the checkpoint keeps both rates
    run = tmp_path / "run"
    overrides = {"method.name": "finetune", "train.lr": 1e-6, "train.head_lr": 5e-2, "train.epochs": 1}
    config = config_for(tiny_model_dir, sentiment, run, **overrides)
    config.method.settings = {}
    train(config)
    step, folder = ckpt.list_checkpoints(run)[-1]
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == [1e-6, 5e-2]
    for bad in ({"train.head_lr": 0}, {"train.lr": -1e-4}):
        with pytest.raises(RunConfigError, match="above 0"):
            load_config(None, bad)
