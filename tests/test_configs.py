"""Every shipped YAML under configs/: it loads strictly, its header is the command that runs it, its task and method
exist, its data is where the registry looks (when ../shared/data is here), and the CLUE ones keep the paper's recipe.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from conftest import REPO_ROOT, tiny_bert_config
from transformers import BertModel

from fltuning.tasks.base import DataError
from fltuning.tasks.registry import task_files, task_names, task_spec
from fltuning.train.build import method_for
from fltuning.train.config import ModelArgs, load_config, parse_overrides
from fltuning.train.data import build_task, load_examples

CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
BY_NAME = pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO_ROOT)) for p in CONFIGS])

# digest §5.2, per CLUE task: (peak LR, epochs, batch, grad accum). AFQMC's DataCLUE version takes AFQMC's.
PAPER_RECIPE = {
    "afqmc": (2e-4, 10, 32, 1),
    "afqmc_dataclue": (2e-4, 10, 32, 1),
    "tnews": (5e-5, 30, 32, 1),
    "iflytek": (5e-5, 30, 32, 1),
    "cmnli": (1e-4, 30, 32, 1),
    "ocnli": (5e-4, 30, 32, 1),
    "csl": (8e-5, 30, 32, 1),
    "cluewsc2020": (3e-4, 40, 128, 1),
    "c3": (1e-4, 50, 4, 4),
    "chid": (8e-5, 30, 16, 2),
    "cmrc2018": (2e-4, 20, 16, 2),
    "cluener2020": (1e-4, 30, 32, 1),
}
# Training files the paper's split needs that ../shared/data lacks (see its SOURCE.md files), and the split that
# the config's header says to use there instead.
ABSENT_FROM_SHARED_DATA = {
    "configs/clue/ocnli.yaml": ("train.50k.json", "10k"),
    "configs/clue/cmrc2018.yaml": ("cmrc2018_train.json", "trial"),
}


def relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def header(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return lines[:end]


def test_configs_are_shipped_for_every_registry_task():
    shipped = {load_config(path).data.task for path in CONFIGS}
    assert set(task_names()) - shipped == set()
    assert {relative(p).split("/")[1] for p in CONFIGS} == {"clue", "fewclue", "custom"}


@BY_NAME
def test_config_loads_strictly(path):
    config = load_config(path)  # RunConfigError on an unknown key or a value of the wrong type
    assert config.model == ModelArgs(), "configs keep the default offline model; --model.name picks another"
    assert config.data.data_dir is None, "the data folder comes from --data.data_dir or $FLTUNING_DATA_DIR"


@BY_NAME
def test_header_says_what_it_is_then_the_command_that_runs_it(path):
    lines = header(path)
    assert len(lines) >= 3, f"{relative(path)}: needs a comment header"
    assert lines[0].startswith("# ") and "fltune" not in lines[0]
    assert lines[1].startswith("# fltune train --config ")
    words = shlex.split(lines[1][2:])
    assert words[3] == relative(path), f"the command in {relative(path)} runs {words[3]}"
    overrides = parse_overrides(words[4:])
    assert set(overrides) <= {"data.data_dir"}
    load_config(REPO_ROOT / words[3], overrides)
    assert "hfl/chinese-roberta-wwm-ext" in "\n".join(lines), "say which model the paper used"


@BY_NAME
def test_task_exists_and_takes_the_split_and_settings(path, tmp_path):
    config = load_config(path)
    spec = task_spec(config.data.task)
    build_task(config.data)  # the task_settings are the task constructor's
    if spec.layout.parts:
        with pytest.raises(DataError):  # the split is accepted; only the (absent) data folder is missing
            task_files(spec.name, tmp_path / "absent", config.data.split)


@BY_NAME
def test_method_builds_on_a_tiny_bert(path):
    config = load_config(path)
    if config.method.budget is not None:
        pytest.skip("a budget is sized on the real model")
    method = method_for(config.method, tiny_bert_config())
    model = method.apply(BertModel(tiny_bert_config()))
    assert method.num_trainable(model) > 0


@pytest.mark.parametrize("task", sorted(PAPER_RECIPE))
def test_clue_configs_keep_the_papers_recipe(task):
    config = load_config(REPO_ROOT / "configs" / "clue" / f"{task}.yaml")
    assert config.data.task == task
    assert (config.method.name, config.method.settings) == ("fl", {"num_units": 160})
    train = config.train
    assert (train.lr, train.epochs, train.batch_size, train.grad_accum) == PAPER_RECIPE[task]
    assert config.data.max_length in (None, task_spec(task).max_length)


@BY_NAME
def test_data_is_where_the_registry_looks(path, data_dir):
    config = load_config(path, {"data.data_dir": str(data_dir)})
    spec = task_spec(config.data.task)
    if not spec.layout.parts:
        pytest.skip("reads the files it names (see the custom example's test)")
    if not any((data_dir / folder).is_dir() for folder in spec.layout.folders):
        pytest.skip(f"{data_dir} has no {' or '.join(spec.layout.folders)} folder")
    try:
        files = task_files(spec.name, data_dir, config.data.split)
    except DataError as err:
        missing, instead = ABSENT_FROM_SHARED_DATA.get(relative(path), (None, None))
        if Path(err.path).name != missing:
            raise
        task_files(spec.name, data_dir, instead)
        pytest.skip(f"{err.path} is not in {data_dir}; --data.split {instead} finds its files")
    assert {"train", "dev"} <= set(files)
    if config.data.max_train_examples is not None:  # the subset is drawn from a larger training set
        _, examples = load_examples(config.data, parts=("train",))
        assert len(examples["train"]) == config.data.max_train_examples


def test_custom_example_reads_its_files(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # its paths are relative to the project root, where its command runs
    config = load_config("configs/custom/example.yaml")
    task, examples = load_examples(config.data)
    assert {part: len(items) for part, items in examples.items()} == {"train": 8, "dev": 4, "test": 4}
    assert task.labels == ["negative", "positive"]
    assert all(example.label is not None for items in examples.values() for example in items)
