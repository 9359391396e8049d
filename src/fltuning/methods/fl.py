"""FL-tuning behind the common method interface: k units in every FFN (``FLModel``), mergeable."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

from fltuning.config import FLTuningConfig
from fltuning.methods.base import MethodError, TuningMethod, copy_named_tensors, register_method
from fltuning.model import FLModel

ADAPTER = "default"


def _as_fl_model(model: nn.Module) -> FLModel:
    if not isinstance(model, FLModel):
        raise MethodError(f"expected the FLModel returned by FLMethod.apply, got {type(model).__name__}")
    return model


@register_method
class FLMethod(TuningMethod):
    """FL-tuning (the paper's method). Settings are ``FLTuningConfig``'s fields (num_units, target_layers, init,
    bias, ...); ``modules_to_save`` is not used here because task heads live outside the backbone."""

    name = "fl"
    mergeable = True

    def __init__(self, **settings: Any):
        self.config = FLTuningConfig(**settings)

    def apply(self, backbone: nn.Module) -> nn.Module:
        return FLModel(backbone, self.config, ADAPTER)

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return _as_fl_model(model).adapter_state_dict(ADAPTER)

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        copy_named_tensors(self.name, self.trainable_state_dict(model), state)

    def settings(self) -> dict[str, Any]:
        return {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if f.init and f.name not in ("base_model_name_or_path", "inference_mode")
        }

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        try:
            return _as_fl_model(model).merge_and_unload(safe_merge=True)
        except ValueError as err:  # MergeError, ConfigError
            raise MethodError(str(err)) from err

    @classmethod
    def for_budget(cls, config: PretrainedConfig, budget: int, **settings: Any) -> FLMethod:
        """The count is affine in k (a·k + b, b from the down-projection biases), so two meta-device builds solve
        for k exactly, for any architecture."""
        counts = [_count_on_meta(config, cls(**(settings | {"num_units": k}))) for k in (1, 2)]
        per_unit, fixed = counts[1] - counts[0], 2 * counts[0] - counts[1]
        k = max(1, round((budget - fixed) / per_unit))
        return cls(**(settings | {"num_units": k}))


def _count_on_meta(config: PretrainedConfig, method: TuningMethod) -> int:
    with torch.device("meta"):
        backbone = AutoModel.from_config(config)
        model = method.apply(backbone)
    return method.num_trainable(model)
