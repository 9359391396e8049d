"""`fltune train` on the real e5-small encoder (real weights, ``-m real_weights``): a few steps on real FewCLUE data,
then the trained adapter reloaded by `fltune evaluate` gives the same scores."""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT
from test_models_real import e5_folder, model_cache  # noqa: F401  (session fixtures: the prepared model, its cache)

from fltuning.cli import main

pytestmark = pytest.mark.real_weights


def test_fl_tuning_e5_small_on_fewclue_cluewsc(e5_folder, data_dir, tmp_path, one_thread, capsys):  # noqa: F811
    run = tmp_path / "run"
    args = ["train", "--config", str(REPO_ROOT / "configs/fewclue/cluewsc.yaml"), "--data-dir", str(data_dir)]
    args += ["--model.name", str(e5_folder), "--method.num_units", "16", "--train.epochs", "1"]
    args += ["--data.max_train_examples", "16", "--data.max_dev_examples", "16", "--data.max_test_examples", "16"]
    args += ["--output.dir", str(run), "--output.progress", "false"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((run / "parameters.json").read_text())
    assert report["method_trainable"] == 12 * (2 * 384 * 16 + 16 + 384)  # 12 layers x (U1, c1, U2, c2)
    assert report["backbone_total"] == 117_653_760
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert main(["evaluate", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["dev"] == summary["dev"]
