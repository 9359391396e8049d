"""The FL units: k extra hidden units in one feed-forward network, their forward, merge and unmerge.

    FFN'(x) = act(x W1 + b1) W2 + b2 + act(x U1 + c1) U2 + c2       # (B,T,d) -> (B,T,d_ff + k) -> (B,T,d)
    gated:    (act(x G1) * x W1) W2 + (act(x V1) * x U1) U2           # LLaMA: V1 is the units' gate

Two ways to run the units, with the same tensors, the same merge and the same saved file:

- side branch (the fast path, used where the architecture table names the FFN's activation): the up projection
  returns x W1 + b1 as before and hands z = x U1 + c1 (B,T,k) to the down projection, which returns
  h W2 + b2 + act(z) U2 + c2 using the FFN's own activation module. The frozen FFN runs untouched; the units cost
  two small matmuls. Widening copies the (B,T,d_ff + k) hidden tensor in ``cat`` forward and again in backward: the
  side branch makes a training step 1-4% faster and an unmerged forward ~10% faster at batch 32 on this project's
  models (docs/performance.md, benchmarks/speed/train_step.py and inference.py: ``fl`` vs ``fl_widened``).
- widened (the generic path, for FFNs with anything besides the activation between up and down, e.g. T5's dropout,
  and user-named FFNs): the up (and gate) projection returns ``cat([x W1 + b1, x U1 + c1])`` and the down projection
  reads ``h[:, :d_ff] W2 + b2 + h[:, d_ff:] U2 + c2``. The model's own activation, gating and dropout then apply to
  the new units unchanged, whatever they are.

Merging is a literal concatenation either way: W1' = [W1; U1], b1' = [b1; c1], W2' = [W2, U2], b2' = b2 + c2
(exact; unmerge slices and restores the saved b2).

Base projections are ``nn.Linear`` (weight (out, in)) or transformers' GPT-2 ``Conv1D`` (weight (in, out)).
Each adapter's tensors live in ``fl_weight[adapter]`` / ``fl_bias[adapter]``; U1 is stored (k, in) and U2 (out, k),
both in ``nn.Linear`` orientation.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class MergeError(ValueError):
    """An adapter cannot be merged (or unmerged) exactly; the message says why."""


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def _setweight_out_in(layer: nn.Module, weight: torch.Tensor) -> None:
    if isinstance(layer, Conv1D):
        layer.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        layer.nf = weight.shape[0]
    else:
        layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        layer.in_features, layer.out_features = weight.shape[1], weight.shape[0]


def _set_bias(layer: nn.Module, bias: torch.Tensor) -> None:
    layer.bias = nn.Parameter(bias.contiguous(), requires_grad=False)


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """TruncatedNormal(0, std) cut at ±2 std, as Keras' TruncatedNormal used by the paper's code."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


class FLProjection(nn.Module):
    """A frozen FFN projection plus the FL tensors of every adapter. Subclasses define the role."""

    role: str

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise MergeError(f"FL-tuning wraps nn.Linear or Conv1D projections, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fl_weight = nn.ParameterDict()
        self.fl_bias = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged: list[tuple[str, torch.Tensor | None]] = []  # (adapter, the base bias before its merge)
        out_in = weight_out_in(base_layer)
        self.in_features, self.out_features = out_in.shape[1], out_in.shape[0]
        self.original_width = self.ffn_width  # the FFN width this projection had before any merge

    # shape of the base weight seen from the FFN: up/gate produce the hidden units, down consumes them
    @property
    def ffn_width(self) -> int:
        out_in = weight_out_in(self.base_layer)
        return out_in.shape[0] if self.role != "down" else out_in.shape[1]

    @property
    def weight(self) -> torch.Tensor:  # some models read ``proj.weight.dtype`` (T5)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_has_bias(self) -> bool:
        return self.base_layer.bias is not None

    def _unmerged_active(self) -> list[str]:
        merged = {name for name, _ in self.merged}
        return [a for a in self.active_adapters if a in self.fl_weight and a not in merged]

    def num_units(self, adapter: str) -> int:
        w = self.fl_weight[adapter]
        return w.shape[0] if self.role != "down" else w.shape[1]

    def add_adapter(self, name: str, num_units: int, bias: bool, init: str, init_std: float) -> None:
        """Create ``name``'s tensors in fp32 (whatever the base dtype), initialised as ``init`` says."""
        device = self.base_layer.weight.device
        shape = (num_units, self.in_features) if self.role != "down" else (self.out_features, num_units)
        weight = torch.empty(shape, device=device, dtype=torch.float32)
        if init == "zero" and self.role == "down":
            nn.init.zeros_(weight)
        else:
            truncated_normal_(weight, init_std)
        self.fl_weight[name] = nn.Parameter(weight)
        if bias:
            n_bias = num_units if self.role != "down" else self.out_features
            self.fl_bias[name] = nn.Parameter(torch.zeros(n_bias, device=device, dtype=torch.float32))

    def delete_adapter(self, name: str) -> None:
        del self.fl_weight[name]
        if name in self.fl_bias:
            del self.fl_bias[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def check_mergeable(self, name: str) -> None:
        if name in self.fl_bias and not self.base_has_bias():
            raise MergeError(
                f"adapter {name!r} has a bias on a projection without one ({type(self.base_layer).__name__}); "
                "it cannot merge exactly. Train with bias='auto' to merge."
            )

    def extra_repr(self) -> str:
        units = {a: self.num_units(a) for a in self.fl_weight}
        return f"role={self.role}, units={units}, active={self.active_adapters}, merged={[m for m, _ in self.merged]}"


# Side-branch hand-over, per thread (nn.DataParallel runs its replicas in threads, and a replica's attributes still
# point at the original modules): {(link id, role): {adapter: x U1 + c1}}, written by FLUp, taken by FLDown.
_PENDING = threading.local()
_LINK_IDS = itertools.count()


def _handover() -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    if not hasattr(_PENDING, "units"):
        _PENDING.units = {}
    return _PENDING.units


class FLUp(FLProjection):
    """Up (or gate) projection. Widened: returns ``cat([x W1 + b1, x U1 + c1 for each active adapter])``. Side
    branch (after ``link_side_branch``): returns ``x W1 + b1`` and hands ``{adapter: x U1 + c1}`` to the down
    projection."""

    def __init__(self, base_layer: nn.Module, role: str = "up"):
        self.role = role
        super().__init__(base_layer)
        self.side_branch: int | None = None  # the link id shared with the down projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        adapters = [] if self.disabled else self._unmerged_active()
        if not adapters:
            return out
        units = {}
        for a in adapters:
            w = self.fl_weight[a]
            units[a] = F.linear(x.to(w.dtype), w, self.fl_bias.get(a))  # (B,T,d) -> (B,T,k)
        if self.side_branch is not None:
            _handover()[(self.side_branch, self.role)] = units
            return out
        return torch.cat([out, *(u.to(out.dtype) for u in units.values())], dim=-1)

    def merge(self, name: str) -> None:
        self.check_mergeable(name)
        layer = self.base_layer
        w = self.fl_weight[name].detach().to(layer.weight.dtype)
        _setweight_out_in(layer, torch.cat([weight_out_in(layer).detach(), w], dim=0))
        if self.base_has_bias():
            new_b = self.fl_bias[name].detach() if name in self.fl_bias else torch.zeros(w.shape[0])
            _set_bias(layer, torch.cat([layer.bias.detach(), new_b.to(layer.bias)]))
        self.merged.append((name, None))

    def unmerge(self) -> str:
        name, _ = self.merged.pop()
        layer, k = self.base_layer, self.num_units(name)
        width = self.ffn_width - k
        _setweight_out_in(layer, weight_out_in(layer).detach()[:width])
        if self.base_has_bias():
            _set_bias(layer, layer.bias.detach()[:width])
        return name


class FLDown(FLProjection):
    """Down projection. Widened: ``h[..., :d_ff] W2 + b2 + sum over active adapters of h[..., their units] U2 + c2``.
    Side branch: ``h W2 + b2 + sum over active adapters of act(z) U2 + c2`` (gated: ``act(z_gate) * z_up``)."""

    role = "down"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        # (act, link id, gated) once linked
        self.side_branch: tuple[Callable[[torch.Tensor], torch.Tensor], int, bool] | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        adapters = [] if self.disabled else self._unmerged_active()
        if not adapters:
            return self.base_layer(h)
        if self.side_branch is not None:
            return self._forward_side_branch(h, adapters)
        # one split (its backward is a single cat) rather than a slice per part (each slice's backward allocates
        # a zero tensor of h's full size): ~8% of an FFN step on the e5-small shape
        parts = h.split([self.ffn_width] + [self.fl_weight[a].shape[1] for a in adapters], dim=-1)
        out = self.base_layer(parts[0])
        for a, part in zip(adapters, parts[1:], strict=True):
            w = self.fl_weight[a]
            out = out + F.linear(part.to(w.dtype), w, self.fl_bias.get(a)).to(out.dtype)
        return out

    def _forward_side_branch(self, h: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        act, link, gated = self.side_branch
        ups, gates = _take(link, "up"), _take(link, "gate") if gated else None
        out = self.base_layer(h)  # h W2 + b2 over the frozen units, untouched
        for a in adapters:
            units = act(gates[a]) * ups[a] if gates is not None else act(ups[a])  # (B,T,k)
            w = self.fl_weight[a]
            out = out + F.linear(units.to(w.dtype), w, self.fl_bias.get(a)).to(out.dtype)
        return out

    def merge(self, name: str) -> None:
        self.check_mergeable(name)
        layer = self.base_layer
        w = self.fl_weight[name].detach().to(layer.weight.dtype)
        _setweight_out_in(layer, torch.cat([weight_out_in(layer).detach(), w], dim=1))
        saved = None
        if self.base_has_bias():
            saved = layer.bias.detach().clone()
            if name in self.fl_bias:
                _set_bias(layer, layer.bias.detach() + self.fl_bias[name].detach().to(layer.bias))
        self.merged.append((name, saved))

    def unmerge(self) -> str:
        name, saved = self.merged.pop()
        layer, k = self.base_layer, self.num_units(name)
        _setweight_out_in(layer, weight_out_in(layer).detach()[:, : self.ffn_width - k])
        if saved is not None:
            _set_bias(layer, saved)  # restore the exact bits, not b2 + c2 - c2
        return name


def _take(link: int, role: str) -> dict[str, torch.Tensor]:
    units = _handover().pop((link, role), None)
    if units is None:
        raise RuntimeError(
            f"FL side branch: the down projection ran without its {role} projection running first; this FFN does "
            "not compute down(act(up(x))), so remove 'act' from its layout to use the widened path"
        )
    return units


def link_side_branch(
    act: Callable[[torch.Tensor], torch.Tensor], up: FLUp, down: FLDown, gate: FLUp | None = None
) -> None:
    """Run this FFN's units as a side branch: ``up`` (and ``gate``) hand x U1 + c1 to ``down``, which applies
    ``act`` (the FFN's own activation, the only thing between up and down) and U2. Only for FFNs computing
    ``down(act(up(x)))`` or ``down(act(gate(x)) * up(x))``. Linking an already linked FFN keeps its link."""
    link = up.side_branch if up.side_branch is not None else next(_LINK_IDS)
    for projection in (up, gate):
        if projection is not None:
            projection.side_branch = link
    down.side_branch = (act, link, gate is not None)


def pad_units(layer: nn.Module, role: str, num_units: int) -> None:
    """Widen a plain projection by ``num_units`` zero units: rows of the up/gate weight (and bias), columns of the
    down weight. Zero down columns make the padded units contribute exactly nothing."""
    out_in = weight_out_in(layer).detach()
    if role == "down":
        zeros = torch.zeros(out_in.shape[0], num_units, dtype=out_in.dtype, device=out_in.device)
        _setweight_out_in(layer, torch.cat([out_in, zeros], dim=1))
    else:
        zeros = torch.zeros(num_units, out_in.shape[1], dtype=out_in.dtype, device=out_in.device)
        _setweight_out_in(layer, torch.cat([out_in, zeros], dim=0))
        if layer.bias is not None:
            _set_bias(layer, torch.cat([layer.bias.detach(), layer.bias.new_zeros(num_units)]))


def fl_num_params(d_in: int, d_out: int, k: int, gated: bool, bias_up: bool, bias_down: bool) -> int:
    """Trainable FL count of one FFN: U1 (and the gate's U1), c1, U2, c2."""
    n_up = 2 if gated else 1
    return n_up * (k * d_in + (k if bias_up else 0)) + d_out * k + (d_out if bias_down else 0)


__all__ = [
    "FLDown",
    "FLProjection",
    "FLUp",
    "MergeError",
    "fl_num_params",
    "link_side_branch",
    "pad_units",
    "truncated_normal_",
    "weight_out_in",
]
