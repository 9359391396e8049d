"""FLTuningConfig: the settings of one FL-tuning adapter, their validation and their JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fltuning import __version__

PEFT_TYPE = "FLTUNING"
CONFIG_NAME = "adapter_config.json"
# Bumped when the adapter folder format changes incompatibly; a folder from a newer format is refused.
FORMAT_VERSION = 1

_FFN_MODULE_KEYS = {"block", "up", "down", "gate", "width_key"}


class ConfigError(ValueError):
    """An invalid FL-tuning setting. The message names the field (or file) to fix."""


@dataclass
class FLTuningConfig:
    """Settings of one FL-tuning adapter.

    Args:
        num_units: k, the hidden units added to every targeted FFN (the paper uses 160).
        target_layers: which FFN blocks get units: None for all, a list of layer indices, or a regular expression
            matched (fullmatch) against the block's module name.
        init: "paper" (U1, U2 ~ TruncatedNormal(init_std, cut at ±2 std), biases 0, so the output moves slightly at
            step 0) or "zero" (U2 = c2 = 0, the model is unchanged at step 0).
        init_std: standard deviation of the truncated normal.
        bias: "auto" (the units get biases c1, c2 exactly where the base FFN projections have biases, so merging
            stays exact), "all" or "none".
        modules_to_save: names (suffix match) of modules trained and saved with the adapter, e.g. a task head.
        ffn_modules: for an architecture not in the table, where its FFN lives:
            {"block": regex with a group named "index", "up": path, "down": path, "gate": path or absent,
             "width_key": config key of the FFN width}; up/gate/down paths are relative to the block.
        base_model_name_or_path: recorded when saving.
        inference_mode: adapter tensors are frozen when True.
    """

    num_units: int = 160
    target_layers: list[int] | str | None = None
    init: str = "paper"
    init_std: float = 0.02
    bias: str = "auto"
    modules_to_save: list[str] | None = None
    ffn_modules: dict[str, str] | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = field(default=PEFT_TYPE, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_units, bool) or not isinstance(self.num_units, int) or self.num_units < 1:
            raise ConfigError(f"num_units must be a positive integer, got {self.num_units!r}")
        if self.init not in ("paper", "zero"):
            raise ConfigError(f"init must be 'paper' or 'zero', got {self.init!r}")
        if not isinstance(self.init_std, (int, float)) or not self.init_std > 0:
            raise ConfigError(f"init_std must be a positive number, got {self.init_std!r}")
        if self.bias not in ("auto", "all", "none"):
            raise ConfigError(f"bias must be 'auto', 'all' or 'none', got {self.bias!r}")
        self._validate_target_layers()
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        if self.ffn_modules is not None:
            self._validate_ffn_modules()

    def _validate_target_layers(self) -> None:
        layers = self.target_layers
        if layers is None:
            return
        if isinstance(layers, str):
            try:
                re.compile(layers)
            except re.error as err:
                raise ConfigError(f"target_layers is not a valid regular expression: {err}") from err
            return
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ConfigError(
                f"target_layers must be None, a non-empty list of layer indices or a regex; got {layers!r}"
            )
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ConfigError(f"target_layers must hold non-negative integers, got {layers!r}")
        self.target_layers = sorted(set(layers))

    def _validate_ffn_modules(self) -> None:
        spec = self.ffn_modules
        if not isinstance(spec, dict):
            raise ConfigError(f"ffn_modules must be a dict with keys {sorted(_FFN_MODULE_KEYS)}, got {spec!r}")
        unknown = set(spec) - _FFN_MODULE_KEYS
        if unknown:
            raise ConfigError(f"ffn_modules has unknown keys {sorted(unknown)}; allowed: {sorted(_FFN_MODULE_KEYS)}")
        for key in ("block", "up", "down"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise ConfigError(f"ffn_modules['{key}'] is required (a module path), got {spec.get(key)!r}")
        try:
            pattern = re.compile(spec["block"])
        except re.error as err:
            raise ConfigError(f"ffn_modules['block'] is not a valid regular expression: {err}") from err
        if "index" not in pattern.groupindex:
            raise ConfigError(
                "ffn_modules['block'] must have a named group 'index', e.g. r'.*layers\\.(?P<index>\\d+)'"
            )

    # ----- JSON round trip -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fltuning_version"] = __version__
        out["format_version"] = FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> FLTuningConfig:
        """Build a config from ``to_dict`` output. Keys this version does not know are ignored with a warning; a
        folder written in a newer, incompatible format is refused."""
        data = dict(data)
        if data.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
            raise ConfigError(f"{source}: peft_type is {data.get('peft_type')!r}, not {PEFT_TYPE!r}")
        fmt = data.pop("format_version", 1)
        made_by = data.pop("fltuning_version", "unknown")
        if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
            raise ConfigError(
                f"{source}: written by fltuning {made_by} in adapter format {fmt}, newer than this fltuning "
                f"{__version__} reads (format {FORMAT_VERSION}); upgrade fltuning"
            )
        data.pop("peft_type", None)
        data.pop("base_ffn", None)  # shapes recorded by FLModel.save_pretrained; checked there, not a setting
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{source}: ignoring keys unknown to fltuning {__version__}: {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | Path, **extra: Any) -> None:
        """Write ``adapter_config.json`` (plus ``extra`` keys, e.g. the base FFN shapes) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict() | extra
        (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FLTuningConfig:
        return cls.from_dict(read_config_json(directory), source=str(Path(directory) / CONFIG_NAME))

    def replace(self, **changes: Any) -> FLTuningConfig:
        return dataclasses.replace(self, **changes)


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The raw ``adapter_config.json`` of an adapter folder. Raises ``ConfigError`` when missing or malformed."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path} not found: {directory} is not an FL-tuning adapter folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data
