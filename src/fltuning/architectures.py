"""Where each architecture keeps its feed-forward network: a declarative table, no ``if model_type == ...`` chains.

An entry names, for one model type, the module that holds one layer's FFN (``block``, a regex with a group
``index`` matched against module names, with or without a task-model prefix such as ``bert.``), the paths of the
up / gate / down projections relative to the block, and the config key holding the FFN width. A model type may list
several layouts (T5 has a plain and a gated FFN); the first whose projections exist is used.

``act`` names the activation applied between the up (and gate) and the down projection, for FFNs where nothing else
sits between them (``down(act(up(x)))`` or ``down(act(gate(x)) * up(x))``). It lets the FL units run as a side
branch next to the frozen FFN, the fast path (``fltuning.layers``). Layouts without it (T5, which applies dropout
between act and wo, and user-named FFNs) widen the projections instead, which needs no knowledge of the activation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fltuning.config import ConfigError


@dataclass(frozen=True)
class FFNLayout:
    block: str  # regex over module names, with a named group "index" (the layer number)
    up: str
    down: str
    gate: str | None = None
    width_key: str | None = "intermediate_size"
    shared_layers: bool = False  # one block's weights serve every depth (ALBERT)
    act: str | None = None  # the activation between up/gate and down, when nothing else sits there

    @property
    def projections(self) -> dict[str, str]:
        """Role -> path relative to the block, for every projection that gets FL units."""
        roles = {"up": self.up, "down": self.down}
        if self.gate is not None:
            roles["gate"] = self.gate
        return roles


_P = r"(?:.*\.)?"  # an optional prefix: "bert.", "model.", "base_model.model.", ...
_BERT = FFNLayout(
    block=_P + r"encoder\.layer\.(?P<index>\d+)",
    up="intermediate.dense",
    down="output.dense",
    act="intermediate.intermediate_act_fn",
)
_LLAMA = FFNLayout(
    block=_P + r"layers\.(?P<index>\d+)",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    act="mlp.act_fn",
)
_T5_BLOCK = _P + r"(?:encoder|decoder)\.block\.(?P<index>\d+)\.layer\.\d+\.DenseReluDense"

ARCHITECTURES: dict[str, tuple[FFNLayout, ...]] = {
    "bert": (_BERT,),
    "roberta": (_BERT,),
    "xlm-roberta": (_BERT,),
    "camembert": (_BERT,),
    "roformer": (_BERT,),
    "electra": (_BERT,),
    "ernie": (_BERT,),
    "distilbert": (
        FFNLayout(
            block=_P + r"transformer\.layer\.(?P<index>\d+)",
            up="ffn.lin1",
            down="ffn.lin2",
            width_key="hidden_dim",
            act="ffn.activation",
        ),
    ),
    # ALBERT shares its layer weights across depth: FL units live in the shared block and so are shared too;
    # target_layers then counts layer groups, not depths.
    "albert": (
        FFNLayout(
            block=_P + r"encoder\.albert_layer_groups\.(?P<index>\d+)\.albert_layers\.\d+",
            up="ffn",
            down="ffn_output",
            shared_layers=True,
            act="activation",
        ),
    ),
    "gpt2": (
        FFNLayout(
            block=_P + r"h\.(?P<index>\d+)", up="mlp.c_fc", down="mlp.c_proj", width_key="n_inner", act="mlp.act"
        ),
    ),
    "llama": (_LLAMA,),
    "mistral": (_LLAMA,),
    "qwen2": (_LLAMA,),
    "qwen3": (_LLAMA,),
    "gemma": (_LLAMA,),
    "t5": (
        FFNLayout(block=_T5_BLOCK, gate="wi_0", up="wi_1", down="wo", width_key="d_ff"),
        FFNLayout(block=_T5_BLOCK, up="wi", down="wo", width_key="d_ff"),
    ),
}
ARCHITECTURES["mt5"] = ARCHITECTURES["t5"]


@dataclass(frozen=True)
class FFNBlock:
    """One located FFN: its module name, layer index, and role -> (module name, module)."""

    name: str
    index: int
    projections: dict[str, tuple[str, nn.Module]]
    act: Callable[[torch.Tensor], torch.Tensor] | None = None  # the layout's ``act``, resolved in this block


def layout_from_config(ffn_modules: dict[str, str]) -> FFNLayout:
    return FFNLayout(
        block=ffn_modules["block"],
        up=ffn_modules["up"],
        down=ffn_modules["down"],
        gate=ffn_modules.get("gate"),
        width_key=ffn_modules.get("width_key"),
    )


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _get_callable(root: nn.Module, path: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation at ``path`` (a module or a plain function attribute), or None when absent."""
    if path is None:
        return None
    target: Any = root
    for part in path.split("."):
        target = getattr(target, part, None)
    return target if callable(target) else None


def find_ffn_blocks(model: nn.Module, ffn_modules: dict[str, str] | None = None) -> tuple[FFNLayout, list[FFNBlock]]:
    """Locate every FFN in ``model``. ``ffn_modules`` (the config field) overrides the table.

    Raises ``ConfigError`` listing what was searched when no FFN is found."""
    if ffn_modules is not None:
        candidates: tuple[FFNLayout, ...] = (layout_from_config(ffn_modules),)
        searched = f"ffn_modules={ffn_modules}"
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"no FFN layout known for model_type {model_type!r}; known: {sorted(ARCHITECTURES)}. "
                "Name the FFN modules with FLTuningConfig(ffn_modules={'block': r'...layers\\.(?P<index>\\d+)', "
                "'up': ..., 'down': ..., 'gate': ... (optional), 'width_key': ...})"
            )
        candidates = ARCHITECTURES[model_type]
        searched = f"the {model_type!r} layouts " + "; ".join(
            f"block {c.block!r} with {sorted(c.projections.values())}" for c in candidates
        )
    named = dict(model.named_modules())
    for layout in candidates:
        pattern = re.compile(layout.block)
        blocks = []
        for name, module in named.items():
            match = pattern.fullmatch(name)
            if match is None:
                continue
            projections = {role: (f"{name}.{path}", _get(module, path)) for role, path in layout.projections.items()}
            if any(m is None for _, m in projections.values()):
                continue
            act = _get_callable(module, layout.act)
            blocks.append(FFNBlock(name=name, index=int(match.group("index")), projections=projections, act=act))
        if blocks:
            return layout, blocks
    raise ConfigError(f"no feed-forward network found in {type(model).__name__}: searched {searched}")
