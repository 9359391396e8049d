"""Parameter-budget matching: give every method the trainable count of FL-tuning with k units.

Each method's ``for_budget`` picks its size (P-tuning v2 prompts, LoRA rank, prompt-tuning tokens); counts come from
building the backbone on the meta device and applying the method, so they are the real counts, not a formula that
could drift. ``match_budget`` and ``format_budget_table`` show the result:

    rows = match_budget(BertConfig(), fl_num_trainable(BertConfig(), 160))
    print(format_budget_table(rows))
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AutoModel, PretrainedConfig

if TYPE_CHECKING:
    from fltuning.methods.base import TuningMethod

# The setting each method's for_budget chooses; None: the method has no size
SIZE_SETTINGS: dict[str, str | None] = {
    "fl": "num_units",
    "ptuning_v2": "num_prompts",
    "lora": "r",
    "prompt_tuning": "num_virtual_tokens",
    "finetune": None,
}
TOLERANCE = 0.05  # a size whose count is further than this from the budget gets a note in the table


def count_on_meta(config: PretrainedConfig, method: TuningMethod) -> int:
    """The trainable count of ``method`` on ``AutoModel.from_config(config)`` built on the meta device (no memory,
    no init; milliseconds even for large shapes). ``config`` is copied: some methods edit the model's config."""
    with torch.device("meta"):
        backbone = AutoModel.from_config(copy.deepcopy(config))
        model = method.apply(backbone)
    return method.num_trainable(model)


def size_for_budget(budget: int, per_unit: int, fixed: int = 0) -> int:
    """The size n >= 1 whose count ``fixed + n * per_unit`` is nearest to ``budget``."""
    return max(1, round((budget - fixed) / per_unit))


def fl_num_trainable(config: PretrainedConfig, num_units: int) -> int:
    """FL-tuning's count for plain FFNs with biases (BERT family): layers x (2·d·k + k + d), i.e. U1, c1, U2 and the
    extra output bias c2 of the paper's code. 2,960,256 for BERT-base and k = 160."""
    d, layers = config.hidden_size, config.num_hidden_layers
    return layers * (2 * d * num_units + num_units + d)


@dataclass
class BudgetRow:
    method: str
    size_setting: str | None
    size: int | None
    count: int
    budget: int

    @property
    def ratio(self) -> float:
        return self.count / self.budget

    @property
    def note(self) -> str:
        if self.size is None:
            return "no size: trains every weight, ignores the budget"
        if abs(self.ratio - 1) <= TOLERANCE:
            return ""
        needed = round(self.budget * self.size / self.count)  # the counts are linear in the size
        return f"capped: the budget needs {self.size_setting}={needed}"


def match_budget(
    config: PretrainedConfig, budget: int, methods: tuple[str, ...] = tuple(SIZE_SETTINGS)
) -> list[BudgetRow]:
    """Each method sized by its ``for_budget`` for a backbone with ``config``, with its trainable count. Methods not
    registered (e.g. one whose module failed to import) are left out."""
    from fltuning.methods.base import method_class, method_names

    rows = []
    for name in methods:
        if name not in method_names():
            continue
        method = method_class(name).for_budget(config, budget)
        setting = SIZE_SETTINGS.get(name)
        size = method.settings()[setting] if setting else None
        rows.append(BudgetRow(name, setting, size, count_on_meta(config, method), budget))
    return rows


def format_budget_table(rows: list[BudgetRow]) -> str:
    """A plain-text table: method, chosen size, trainable count, percent of the budget, note."""
    lines = [f"{'method':<14} {'size':<22} {'trainable':>12} {'% of budget':>12}  note"]
    for row in rows:
        size = f"{row.size_setting}={row.size}" if row.size_setting else "-"
        lines.append(f"{row.method:<14} {size:<22} {row.count:>12,} {row.ratio:>12.2%}  {row.note}".rstrip())
    return "\n".join(lines)
