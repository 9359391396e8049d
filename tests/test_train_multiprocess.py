"""`fltune train` under `torchrun` with 2 CPU processes (gloo): the same command, the same kind of run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_train import config_for, eval_lines, write_sentiment

from fltuning.train.run import train


def test_two_processes_train_to_a_run_folder_of_the_same_shape(tiny_model_dir, tmp_path, one_thread):
    files = write_sentiment(tmp_path / "data")
    args = ["--model.name", str(tiny_model_dir), "--model.pooling", "mean", "--data.task", "custom"]
    for part in ("train", "dev", "test"):
        args += [f"--data.{part}_file", str(files[part])]
    args += ["--method.num_units", "16", "--train.epochs", "2", "--train.batch_size", "8", "--train.lr", "0.01"]
    args += ["--output.progress", "false"]

    single = tmp_path / "single"
    reference = train(config_for(tiny_model_dir, files, single, **{"train.epochs": 2}))

    double = tmp_path / "double"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "fltuning.cli", "train", *args, "--output.dir", str(double)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    assert json.loads((double / "run.json").read_text())["processes"] == 2
    results = json.loads((double / "results.json").read_text())
    assert results.keys() == reference.keys() and results["dev"].keys() == reference["dev"].keys()
    # each process takes 8 of every 16 examples: half the optimizer steps of one process with batch 8
    assert results["steps"] == reference["steps"] // 2 == 8
    evals = [line for line in eval_lines(double) if line["split"] == "dev"]
    assert [e["step"] for e in evals] == [4, 8]  # logged once, by the main process
    assert len((double / "predictions" / "custom_predict.json").read_text().splitlines()) == 32
    assert done.stdout.count('"task"') == 1  # one summary line
