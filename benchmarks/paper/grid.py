"""The paper-comparison grid: which methods, tasks and seeds run, and every setting that differs from the task's YAML.

A cell is (setting, task, method, seed). Its configuration is built in four layers, each overriding the last:

1. the task's YAML in ``configs/`` (the paper's recipe for FL-tuning: LR, batch, epochs, max length), or
   ``Task.fallback`` when that file is missing; its ``method`` section is dropped;
2. ``Task.overrides``: what this benchmark changes, each with its reason (mostly cost: 2 CPU cores), and the
   LR floor ``MIN_TASK_LR`` for the methods that take the task's LR (FL-tuning and P-tuning v2);
3. ``Method.overrides``: the method, its size and, where the paper's task LR does not suit it, its LR;
4. the cell's seed: FewCLUE split k (or the k-th drawn split) and ``train.seed`` k.

Held-out parts that the data does not provide ready-made are drawn once, reproducibly, by ``splits.py``
(``Carve`` rows below), so that every reported score is on examples used neither to train nor to pick the
checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MAX_POSITIONS = 512  # e5-small's position table: prompt tuning's virtual tokens count against it

FL_UNITS = 160  # the paper's code: ffn_prompt_size=160 in every task script (digest §2.3)
# The lowest LR FL-tuning and P-tuning v2 get. The paper's task LRs (5e-5 to 5e-4) were set for 30-50 epochs of full
# data (thousands to tens of thousands of updates); every run here has 10-100x fewer. Measured on FewCLUE TNEWS
# split 0 (dev only): at the paper's 5e-5, FL-tuning's training loss stays at ln 15 (chance) for 130 updates; at
# 5e-4 dev accuracy reaches 50% within 20 epochs. Tasks whose paper LR is higher keep it.
MIN_TASK_LR = 3e-4
BUDGET = f"fl:{FL_UNITS}"
# The GlobalPointer head (CLUENER, CMRC2018) is new and large (491,520 parameters on e5-small), and how fast it
# learns decided these tasks more than the method did:
# - few-shot (300 updates): every method's head trains at FEWSHOT_HEAD_LR. With the head at the method's LR, the
#   score followed that LR, not the method: FL-tuning (3e-4) and LoRA (5e-4) scored F1 0 on every split, P-tuning v2
#   at 3e-4 14.4, while the arms at 5e-3 (P-tuning v2) and 3e-2 (prompt tuning) reached 46.0 and 42.6 (those runs:
#   benchmarks/paper/superseded/); with every head at 3e-3, FL-tuning scores 55.1 over the 5 splits.
# - larger data (1,008 updates of CLUENER): the head trains at the method's LR, as in the paper's code. The
#   parameter-efficient methods learned on seeds 0 and 1 (F1 45-69), but FL-tuning's seed 2 (3e-4) never left the
#   no-span plateau (training loss ~1.2 from update 50 to 1,008, dev F1 0 throughout), where seeds 0 and 1 left it
#   after 150-250 updates. Full fine-tuning's head trains at 3e-4 (the rate FL-tuning's head gets) while its
#   backbone stays at 3e-5: at 3e-5 the head scored no span above 0 in 1,008 updates (training loss flat at ~0.75
#   from update 370; superseded/).
FEWSHOT_HEAD_LR = 3e-3
POINTER_HEAD = {"finetune": {"train.head_lr": MIN_TASK_LR}}
FEWSHOT_POINTER_WHY = (
    f" Every method's pointer head trains at {FEWSHOT_HEAD_LR:g} (see FEWSHOT_HEAD_LR in grid.py: at the "
    "method's own LR the score followed the head's LR, FL-tuning and LoRA predicting no span in 300 updates)."
)
POINTER_WHY = (
    " Full fine-tuning's head trains at 3e-4, its backbone at 3e-5 (see POINTER_HEAD in grid.py: at 3e-5 the new "
    "pointer head predicted no span in 1,008 updates of full CLUENER)."
)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    overrides: dict[str, Any]
    why: str


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method(
            "fl",
            f"FL-tuning (k={FL_UNITS})",
            {"method.name": "fl", "method.num_units": FL_UNITS},
            f"k={FL_UNITS} as in the paper's code; the task's LR from the paper's code (the YAML's), at least "
            f"{MIN_TASK_LR:g} (see MIN_TASK_LR).",
        ),
        Method(
            "ptuning_v2",
            "P-tuning v2 (FL's LR)",
            {"method.name": "ptuning_v2", "method.budget": BUDGET},
            f"prompts per layer sized to FL-tuning's trainable count with k={FL_UNITS} on this model (161 on "
            "e5-small); the same task LR as FL-tuning, as the paper's code runs both methods from one script.",
        ),
        Method(
            "ptuning_v2_lr",
            "P-tuning v2 (LR 5e-3)",
            {"method.name": "ptuning_v2", "method.budget": BUDGET, "train.lr": 5e-3},
            "the same prompts at an LR of its own: at FL-tuning's LRs (3e-4 to 5e-4) P-tuning v2's training loss "
            "barely moves within a few hundred updates (few-shot CLUEWSC, OCNLI), so this checks whether FL-tuning's "
            "lead is only the LR. 5e-3 is the low end of the P-tuning v2 paper's range (5e-3 to 1e-2); on FewCLUE "
            "TNEWS split 0 (dev only, 20 epochs) it reached 54% dev accuracy, FL-tuning at 5e-4 50%.",
        ),
        Method(
            "prompt_tuning",
            "Prompt tuning",
            {"method.name": "prompt_tuning", "method.num_virtual_tokens": 20, "train.lr": 3e-2},
            "20 input prompts (sampled-vocabulary init). Its whole budget is 20 x 384 = 7,680 parameters: FL's "
            "budget would need ~3,900 virtual tokens, more than the 512 positions. LR 3e-2: input prompts need "
            "LRs far above the paper's task LRs (Lester et al. 2021 use 0.3 with Adafactor).",
        ),
        Method(
            "lora",
            "LoRA",
            {"method.name": "lora", "method.budget": BUDGET, "train.lr": 5e-4},
            "all attention and FFN projections, rank sized to FL-tuning's budget (r=18 on e5-small), alpha 16, "
            "dropout 0.1; LR 5e-4, the upper end of Hu et al. 2021's RoBERTa-base range (4e-4 to 5e-4).",
        ),
        Method(
            "finetune",
            "Full fine-tuning",
            {"method.name": "finetune", "train.lr": 3e-5},
            "every weight trains; LR 3e-5, the usual BERT-base fine-tuning LR (the paper's code has no "
            "fine-tuning recipe; its task LRs, up to 5e-4, are for the small added modules).",
        ),
    )
}


@dataclass(frozen=True)
class Carve:
    """Draw disjoint random parts from one file: ``parts`` maps part -> size (None: all that is left, in order).

    ``per_seed``: a new draw for each seed (few-shot splits), else one fixed draw (seed 0) shared by all seeds.
    ``squad``: the file is SQuAD-style JSON (the unit is a question), else JSON Lines (the unit is a line)."""

    source: str  # relative to the data directory
    parts: dict[str, int | None]
    per_seed: bool = False
    squad: bool = False


@dataclass(frozen=True)
class Task:
    key: str  # the grid's name for it (runs/<setting>/<key>/...)
    label: str
    config: str  # the base YAML, relative to the repository root
    fallback: dict[str, Any]  # dotted settings used when the YAML is missing
    overrides: dict[str, Any] = field(default_factory=dict)
    why: str = ""  # reasons for the overrides and the carved parts
    carve: tuple[Carve, ...] = ()
    files: dict[str, str] = field(default_factory=dict)  # part -> a data file used whole (relative to data dir)
    fewclue: bool = False  # seed k selects FewCLUE's split k
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method key -> settings, last
    minutes: float = 10.0  # a guess of one run's wall time here, for the ETA until a run has been timed


FEWSHOT = (
    Task(
        "cluewsc",
        "CLUEWSC2020",
        "configs/fewclue/cluewsc.yaml",
        {"data.task": "fewclue/cluewsc", "train.epochs": 50, "train.batch_size": 8, "train.lr": 3e-4},
        fewclue=True,
        minutes=6,
    ),
    Task(
        "csl",
        "CSL",
        "configs/fewclue/csl.yaml",
        {"data.task": "fewclue/csl", "train.epochs": 50, "train.batch_size": 8, "train.lr": 8e-5},
        fewclue=True,
        minutes=12,
    ),
    Task(
        "ocnli",
        "OCNLI",
        "configs/fewclue/ocnli.yaml",
        {"data.task": "fewclue/ocnli", "train.epochs": 50, "train.batch_size": 8, "train.lr": 5e-4},
        fewclue=True,
        minutes=8,
    ),
    Task(
        "tnews",
        "TNEWS",
        "configs/fewclue/tnews.yaml",
        {"data.task": "fewclue/tnews", "train.epochs": 50, "train.batch_size": 32, "train.lr": 5e-5},
        fewclue=True,
        minutes=15,
    ),
    Task(
        "chid",
        "CHID",
        "configs/fewclue/chid.yaml",
        {"data.task": "fewclue/chid", "train.epochs": 50, "train.batch_size": 8, "train.lr": 8e-5},
        fewclue=True,
        minutes=25,
    ),
    Task(
        "cluener2020",
        "CLUENER2020",
        "configs/fewclue/cluener2020.yaml",
        {"data.task": "cluener2020", "train.epochs": 50, "train.batch_size": 32, "train.lr": 1e-4},
        overrides={
            "data.max_train_examples": None,
            "data.sample_seed": 0,
            "train.epochs": 30,
            "train.head_lr": FEWSHOT_HEAD_LR,
        },
        why="FewCLUE-style: train_k and dev_k are 320 sentences each, drawn without overlap from CLUENER's "
        "training set with seed k (about 32 per entity type); test is CLUENER's labelled dev set (1,343), never "
        "used to select. 30 epochs (the full task's) instead of the YAML's 50: cost." + FEWSHOT_POINTER_WHY,
        carve=(Carve("cluener2020/train.jsonl", {"train": 320, "dev": 320}, per_seed=True),),
        files={"test": "cluener2020/dev.jsonl"},
        minutes=15,
    ),
    Task(
        "iflytek",
        "IFLYTEK",
        "configs/fewclue/iflytek.yaml",
        {"data.task": "fewclue/iflytek", "train.epochs": 30, "train.batch_size": 32, "train.lr": 5e-5},
        overrides={"train.epochs": 10},
        why="10 epochs (290 updates) instead of 30: a split has 928 long texts, and 30 epochs would take about "
        "an hour per run on 2 cores.",
        fewclue=True,
        minutes=45,
    ),
    Task(
        "cmrc2018",
        "CMRC2018",
        "configs/fewclue/cmrc2018.yaml",
        {
            "data.task": "cmrc2018",
            "data.split": "trial",
            "data.task_settings": {"window_step": 128},
            "train.epochs": 30,
            "train.batch_size": 16,
            "train.grad_accum": 2,
            "train.lr": 2e-4,
        },
        overrides={
            "data.max_train_examples": None,
            "data.sample_seed": 0,
            "train.epochs": 20,
            "train.head_lr": FEWSHOT_HEAD_LR,
        },
        why="FewCLUE-style: train_k and dev_k are 128 questions each, drawn without overlap from the trial set "
        "(1,002) with seed k; test is a fixed random 500 of the dev set's 3,219 questions (cost: 512-token "
        "windows on 2 cores). 20 epochs (the full task's) instead of the YAML's 30: cost." + FEWSHOT_POINTER_WHY,
        carve=(
            Carve("cmrc2018/cmrc2018_trial.json", {"train": 128, "dev": 128}, per_seed=True, squad=True),
            Carve("cmrc2018/cmrc2018_dev.json", {"test": 500}, squad=True),
        ),
        minutes=60,
    ),
)

FULL = (
    Task(
        "ocnli",
        "OCNLI (10k)",
        "configs/clue/ocnli.yaml",
        {"data.task": "ocnli", "train.epochs": 30, "train.batch_size": 32, "train.lr": 5e-4},
        overrides={"data.split": "10k", "train.epochs": 3, "train.eval_every": 100},
        why="train.10k (the 50k file is not available); the dev set (2,999) is cut once into 1,000 to select "
        "and 1,999 to report (OCNLI's test labels are not public). 3 epochs instead of 30 and an evaluation "
        "every 100 updates: cost (30 epochs of 10k pairs is about 4 h per run here).",
        carve=(Carve("ocnli/dev.json", {"dev": 1000, "test": None}),),
        minutes=40,
    ),
    Task(
        "cluener2020",
        "CLUENER2020",
        "configs/clue/cluener2020.yaml",
        {"data.task": "cluener2020", "train.epochs": 30, "train.batch_size": 32, "train.lr": 1e-4},
        overrides={"train.epochs": 3, "train.eval_every": 100},
        why="all 10,748 training sentences; the labelled dev set (1,343) is cut once into 343 to select and "
        "1,000 to report (the test set has no labels). 3 epochs instead of 30, an evaluation every 100 updates: "
        "cost." + POINTER_WHY,
        method_overrides=POINTER_HEAD,
        carve=(Carve("cluener2020/dev.jsonl", {"dev": 343, "test": None}),),
        minutes=30,
    ),
    Task(
        "afqmc_dataclue",
        "AFQMC (DataCLUE)",
        "configs/clue/afqmc_dataclue.yaml",
        {"data.task": "afqmc_dataclue", "train.epochs": 10, "train.batch_size": 32, "train.lr": 2e-4},
        overrides={"train.epochs": 3, "train.eval_every": 100, "data.max_dev_examples": 1000},
        why="DataCLUE's AFQMC: 10k training pairs whose train and dev labels carry deliberate noise, and a clean "
        "test_public (2,000) that is reported. Selection on a fixed random 1,000 of the noisy dev set; 3 epochs "
        "instead of 10, an evaluation every 100 updates: cost.",
        minutes=30,
    ),
    Task(
        "cmrc2018",
        "CMRC2018 (trial)",
        "configs/clue/cmrc2018.yaml",
        {
            "data.task": "cmrc2018",
            "data.task_settings": {"window_step": 128},
            "train.epochs": 20,
            "train.batch_size": 16,
            "train.grad_accum": 2,
            "train.lr": 2e-4,
        },
        overrides={"data.split": "trial", "train.epochs": 3, "train.eval_every": 20},
        why="trains on the trial set (1,002 questions; the 10k train file is not available); the dev set is cut "
        "once into 300 questions to select and 1,000 to report (the rest unused: cost). 3 epochs instead of 20, "
        "an evaluation every 20 updates: cost (512-token windows)." + POINTER_WHY,
        method_overrides=POINTER_HEAD,
        carve=(Carve("cmrc2018/cmrc2018_dev.json", {"dev": 300, "test": 1000}, squad=True),),
        minutes=60,
    ),
    Task(
        "c3",
        "C3",
        "configs/clue/c3.yaml",
        {
            "data.task": "c3",
            "train.epochs": 50,
            "train.batch_size": 4,
            "train.grad_accum": 4,
            "train.lr": 1e-4,
            "train.eval_batch_size": 8,
        },
        overrides={
            "data.max_train_examples": 2000,
            "data.max_dev_examples": 500,
            "data.max_test_examples": 1000,
            "data.max_length": 256,
            "train.epochs": 2,
            "train.eval_every": 25,
        },
        why="a fixed random 2,000 of the 11,869 training questions, 500 dev questions to select and 1,000 of the "
        "labelled test questions to report, max length 256 instead of 512, 2 epochs instead of 50, an evaluation "
        "every 25 updates: cost (each question is 4 sequences).",
        minutes=60,
    ),
)

SETTINGS: dict[str, tuple[Task, ...]] = {"fewshot": FEWSHOT, "full": FULL}
SEEDS: dict[str, tuple[int, ...]] = {"fewshot": (0, 1, 2, 3, 4), "full": (0, 1, 2)}
SETTING_LABELS = {"fewshot": "Few-shot", "full": "Larger data"}


@dataclass(frozen=True)
class Cell:
    setting: str
    task: Task
    method: Method
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.task.key}/{self.method.key}/seed{self.seed}"


def find_task(setting: str, key: str) -> Task:
    for task in SETTINGS[setting]:
        if task.key == key:
            return task
    known = ", ".join(t.key for t in SETTINGS[setting])
    raise KeyError(f"--tasks: no task {key!r} in setting {setting!r}; it has {known}")


def cells(
    setting: str, tasks: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None
) -> list[Cell]:
    """The grid in run order: tasks in the order given (default: the table's, cheapest first), then seeds, then
    methods, so that a partial grid has every method on the first seeds. Raises ``KeyError`` for unknown names."""
    chosen_tasks = [find_task(setting, key) for key in tasks] if tasks else list(SETTINGS[setting])
    for key in methods or []:
        if key not in METHODS:
            raise KeyError(f"--methods: no method {key!r}; methods are {', '.join(METHODS)}")
    chosen_methods = [METHODS[key] for key in methods] if methods else list(METHODS.values())
    chosen_seeds = seeds if seeds is not None else list(SEEDS[setting])
    return [Cell(setting, t, m, s) for t in chosen_tasks for s in chosen_seeds for m in chosen_methods]


def yaml_settings(path: Path) -> dict[str, Any]:
    """The YAML's keys as dotted settings, without its ``method`` section (each grid method brings its own)."""
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {
        f"{section}.{key}": value
        for section, values in loaded.items()
        if section != "method"
        for key, value in (values or {}).items()
    }


def base_settings(task: Task) -> tuple[dict[str, Any], str]:
    """Layer 1: the task's YAML (or its fallback); returns the settings and where they came from."""
    path = ROOT / task.config
    if path.is_file():
        return yaml_settings(path), task.config
    return dict(task.fallback), "grid.py fallback (missing " + task.config + ")"


def cell_settings(cell: Cell) -> dict[str, Any]:
    """Layers 1-4 as dotted settings (no paths: ``run.py`` adds the data files, model and output folder)."""
    settings, _ = base_settings(cell.task)
    settings |= cell.task.overrides
    if "train.lr" not in cell.method.overrides:  # the methods that take the task's LR
        settings["train.lr"] = max(float(settings["train.lr"]), MIN_TASK_LR)
    settings |= cell.method.overrides
    settings |= cell.task.method_overrides.get(cell.method.key, {})
    if cell.task.fewclue:
        settings["data.split"] = cell.seed
    settings["train.seed"] = cell.seed
    if cell.method.key == "prompt_tuning":  # the virtual tokens take positions too
        from fltuning.tasks.registry import task_spec

        length = settings.get("data.max_length") or task_spec(settings["data.task"]).max_length
        virtual = settings["method.num_virtual_tokens"]
        if length + virtual > MAX_POSITIONS:
            settings["data.max_length"] = MAX_POSITIONS - virtual
    return settings
