"""FLModel: FL-tuning injected into any transformers model, with PEFT's names.

    model = get_fl_model(AutoModelForSequenceClassification.from_config(cfg), FLTuningConfig(num_units=160,
                         modules_to_save=["classifier"]))
    model.save_pretrained("adapter/")                    # adapter_config.json + adapter_model.safetensors
    model = FLModel.from_pretrained(base, "adapter/")    # is_trainable=False by default
    plain = model.merge_and_unload()                     # a vanilla model whose FFN width grew by k

Named adapters (``add_adapter``, ``set_adapter``, ``delete_adapter``, ``disable_adapter()``), exact merge and unmerge,
and ``modules_to_save`` (task heads trained and saved with the adapter, one copy per adapter) follow PEFT.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fltuning.architectures import FFNBlock, FFNLayout, find_ffn_blocks
from fltuning.config import ConfigError, FLTuningConfig, read_config_json
from fltuning.layers import FLDown, FLProjection, FLUp, MergeError, link_side_branch, pad_units, weight_out_in

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


class AdapterLoadError(ValueError):
    """An adapter folder does not fit the model it is loaded into, or is damaged; the message says what to fix."""


class ModulesToSave(nn.Module):
    """A module trained with the adapters (e.g. a task head): one copy per adapter, the original kept frozen."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)


class FLModel(nn.Module):
    """A transformers model with FL-tuning adapters. Calls and unknown attributes go to the wrapped model."""

    def __init__(self, model: nn.Module, config: FLTuningConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, FLTuningConfig] = {}
        self.targeted_blocks: dict[str, list[str]] = {}  # adapter -> FFN block names
        self.active_adapters: list[str] = []
        self._disabled = False
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # ----- plumbing --------------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def _fl_layers(self) -> Iterator[tuple[str, FLProjection]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, FLProjection):
                yield name, module

    def _heads(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSave):
                yield name, module

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    # ----- adapters ----------------------------------------------------------------------------------------------

    def _plan(self, config: FLTuningConfig) -> tuple[FFNLayout, list[FFNBlock]]:
        layout, blocks = find_ffn_blocks(self.base_model, config.ffn_modules)
        if config.target_layers is None:
            chosen = blocks
        elif isinstance(config.target_layers, str):
            chosen = [b for b in blocks if re.fullmatch(config.target_layers, b.name)]
        else:
            present = {b.index for b in blocks}
            missing = sorted(set(config.target_layers) - present)
            if missing:
                raise ConfigError(f"target_layers {missing} do not exist; this model has layers {sorted(present)}")
            chosen = [b for b in blocks if b.index in config.target_layers]
        if not chosen:
            raise ConfigError(f"target_layers={config.target_layers!r} matches none of {[b.name for b in blocks]}")
        return layout, chosen

    def _find_heads(self, names: list[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for target in names:
            found[target] = [
                name
                for name, module in self.base_model.named_modules()
                if (name == target or name.endswith("." + target))
                and not isinstance(module, FLProjection)
                and ".modules_to_save." not in f".{name}."
                and not name.endswith(".original_module")
            ]
            if not found[target]:
                raise ConfigError(f"modules_to_save: no module named {target!r} in {type(self.base_model).__name__}")
        return found

    def add_adapter(self, adapter_name: str, config: FLTuningConfig) -> None:
        """Inject a new, inactive adapter. Raises ``ConfigError`` (leaving the model untouched) when the name is
        taken, the FFNs cannot be found or a head is missing."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ConfigError(f"adapter name must be a non-empty string without dots, got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists; delete it or choose another name")
        layout, blocks = self._plan(config)
        heads = self._find_heads(config.modules_to_save or [])
        for block in blocks:
            wrapped = {}
            for role, (path, module) in block.projections.items():
                if not isinstance(module, FLProjection):
                    module = FLUp(module, role) if role != "down" else FLDown(module)
                    self.base_model.set_submodule(path, module)
                use_bias = {"all": True, "none": False, "auto": module.base_has_bias()}[config.bias]
                module.add_adapter(adapter_name, config.num_units, use_bias, config.init, config.init_std)
                wrapped[role] = module
            if block.act is not None:  # the fast path: units beside the frozen FFN (fltuning.layers)
                link_side_branch(block.act, wrapped["up"], wrapped["down"], wrapped.get("gate"))
        for paths in heads.values():
            for path in paths:
                module = self.base_model.get_submodule(path)
                if not isinstance(module, ModulesToSave):
                    module = ModulesToSave(module)
                    self.base_model.set_submodule(path, module)
                module.add_adapter(adapter_name)
        self.peft_config[adapter_name] = config
        self.targeted_blocks[adapter_name] = [b.name for b in blocks]
        self._layout = layout
        self._apply_state()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or several, whose units then add up) the active, trainable adapter(s)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ConfigError(f"unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}")
        if any(layer.merged for _, layer in self._fl_layers()):
            raise MergeError("unmerge_adapter() before switching adapters")
        self.active_adapters = names
        self._apply_state()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}")
        if any(adapter_name in [m for m, _ in layer.merged] for _, layer in self._fl_layers()):
            raise MergeError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it")
        for _, layer in self._fl_layers():
            if adapter_name in layer.fl_weight:
                layer.delete_adapter(adapter_name)
        for _, head in self._heads():
            if adapter_name in head.modules_to_save:
                del head.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        del self.targeted_blocks[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        if not self.active_adapters and self.peft_config:
            self.active_adapters = [next(iter(self.peft_config))]
        self._apply_state()

    def _apply_state(self) -> None:
        """Push active/disabled state to every layer and head, and set requires_grad: only the active adapters'
        tensors (and head copies) train, unless their config says inference_mode."""
        for _, layer in self._fl_layers():
            layer.active_adapters = list(self.active_adapters)
            layer.disabled = self._disabled
            for name, param in list(layer.fl_weight.items()) + list(layer.fl_bias.items()):
                param.requires_grad_(name in self.active_adapters and not self.peft_config[name].inference_mode)
        for _, head in self._heads():
            head.active_adapter = next((a for a in self.active_adapters if a in head.modules_to_save), None)
            head.disabled = self._disabled
            for name, copy_ in head.modules_to_save.items():
                trainable = name == head.active_adapter and not self.peft_config[name].inference_mode
                for param in copy_.parameters():
                    param.requires_grad_(trainable)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes exactly the base model (merged adapters are unmerged, and merged back
        on exit)."""
        merged = self._merged_adapters()
        if merged:
            self.unmerge_adapter()
        previous = self._disabled
        self._disabled = True
        self._apply_state()
        try:
            yield
        finally:
            self._disabled = previous
            self._apply_state()
            if merged:
                self.merge_adapter(merged)

    # ----- merge ---------------------------------------------------------------------------------------------------

    def _merged_adapters(self) -> list[str]:
        for _, layer in self._fl_layers():
            return [m for m, _ in layer.merged]
        return []

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base projections: W1' = [W1; U1], W2' = [W2, U2],
        b2' = b2 + c2. Already merged adapters are skipped with a warning. ``safe_merge`` refuses non-finite tensors
        before changing anything."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        done = self._merged_adapters()
        todo = [n for n in names if n not in done]
        if not todo:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        for name in todo:
            if name not in self.peft_config:
                raise ConfigError(f"no adapter named {name!r}")
            for _, layer in self._fl_layers():
                if name not in layer.fl_weight:
                    continue
                layer.check_mergeable(name)
                tensors = [layer.fl_weight[name]] + ([layer.fl_bias[name]] if name in layer.fl_bias else [])
                if safe_merge and not all(torch.isfinite(t).all() for t in tensors):
                    raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        for name in todo:
            for _, layer in self._fl_layers():
                if name in layer.fl_weight:
                    layer.merge(name)
                else:  # keep every layer's merge stack aligned so unmerge can pop in lockstep
                    layer.merged.append((name, None))

    def unmerge_adapter(self) -> None:
        """Undo every merge, last first; restores the base weights bit for bit."""
        for _, layer in self._fl_layers():
            while layer.merged:
                name = layer.merged[-1][0]
                if name in layer.fl_weight:
                    layer.unmerge()
                else:
                    layer.merged.pop()

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None, pad_untargeted: bool = True
    ) -> nn.Module:
        """Merge and return the plain transformers model, whose config's FFN-width key grew by the merged units.

        Every FFN must end with one width (a config holds a single one): layers an adapter did not target get zero
        units (exact: their down columns are zero), or, with ``pad_untargeted=False``, the merge is refused."""
        layout: FFNLayout = self._layout
        if layout.width_key is None:
            raise MergeError("the FFN width key of this architecture is unknown; name it in ffn_modules['width_key']")
        config = self.base_model.config
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        _, blocks = find_ffn_blocks(self.base_model, self.peft_config[self.active_adapter].ffn_modules)
        widths = {b.name: _projection_width(b) for b in blocks}
        target = max(widths.values())
        if len(set(widths.values())) > 1 and not pad_untargeted:
            self.unmerge_adapter()
            raise MergeError(
                f"FFN widths differ after merging ({widths}); a config holds one width: pass "
                "pad_untargeted=True to pad the others with zero units"
            )
        for block in blocks:
            for role, (path, module) in block.projections.items():
                plain = module.base_layer if isinstance(module, FLProjection) else module
                if widths[block.name] < target:
                    pad_units(plain, role, target - widths[block.name])
                self.base_model.set_submodule(path, plain)
        for path, head in list(self._heads()):
            chosen = head.modules_to_save[head.active_adapter] if head.active_adapter else head.original_module
            for p in chosen.parameters():
                p.requires_grad_(False)
            self.base_model.set_submodule(path, chosen)
        setattr(config, layout.width_key, target)
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original transformers model."""
        self.unmerge_adapter()
        for path, layer in list(self._fl_layers()):
            self.base_model.set_submodule(path, layer.base_layer)
        for path, head in list(self._heads()):
            self.base_model.set_submodule(path, head.original_module)
        return self.base_model

    # ----- counting ------------------------------------------------------------------------------------------------

    def count_parameters(self) -> dict[str, int]:
        """Trainable FL units, trainable head, and all parameters of the model (FL tensors included)."""
        fl = sum(
            p.numel()
            for _, l in self._fl_layers()
            for p in [*l.fl_weight.values(), *l.fl_bias.values()]
            if p.requires_grad
        )
        head = sum(p.numel() for _, h in self._heads() for p in h.modules_to_save.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.base_model.parameters())
        return {"fl": fl, "head": head, "trainable": fl + head, "all": total}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        counts = self.count_parameters()
        return counts["trainable"], counts["all"]

    def print_trainable_parameters(self) -> None:
        c = self.count_parameters()
        print(
            f"trainable params: {c['trainable']:,} (FL units {c['fl']:,} + head {c['head']:,}) || "
            f"all params: {c['all']:,} || trainable%: {100 * c['trainable'] / c['all']:.4f}"
        )

    # ----- save / load ---------------------------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors and its head copies, keyed PEFT-style without the adapter name."""
        state = {}
        for path, layer in self._fl_layers():
            if adapter_name in layer.fl_weight:
                state[f"{KEY_PREFIX}{path}.fl_weight"] = layer.fl_weight[adapter_name]
                if adapter_name in layer.fl_bias:
                    state[f"{KEY_PREFIX}{path}.fl_bias"] = layer.fl_bias[adapter_name]
        for path, head in self._heads():
            if adapter_name in head.modules_to_save:
                for key, value in head.modules_to_save[adapter_name].state_dict().items():
                    state[f"{KEY_PREFIX}{path}.{key}"] = value
        return state

    def _base_ffn(self, adapter_name: str) -> dict[str, Any]:
        shapes = {}
        for path, layer in self._fl_layers():
            if adapter_name in layer.fl_weight:
                shapes[path] = [layer.in_features, layer.original_width, layer.out_features]
        return {"model_type": getattr(self.base_model.config, "model_type", None), "projections": shapes}

    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (the FL tensors and the head
        only): "default" into ``save_directory``, others into ``save_directory/<name>/``."""
        root = Path(save_directory)
        names = list(self.peft_config) if selected_adapters is None else selected_adapters
        for name in names:
            if name not in self.peft_config:
                raise ConfigError(f"no adapter named {name!r}; this model has {sorted(self.peft_config)}")
            directory = root if name == "default" else root / name
            directory.mkdir(parents=True, exist_ok=True)
            config = self.peft_config[name]
            if config.base_model_name_or_path is None:
                config = config.replace(base_model_name_or_path=getattr(self.base_model, "name_or_path", None) or None)
            state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict(name).items()}
            save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "peft_type": "FLTUNING"})
            config.save_pretrained(directory, base_ffn=self._base_ffn(name))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: FLTuningConfig | None = None,
    ) -> FLModel:
        """Load an adapter folder onto ``model`` (a base transformers model built as for training)."""
        config = config or FLTuningConfig.from_pretrained(model_id)
        fl_model = cls(model, config.replace(inference_mode=not is_trainable), adapter_name)
        fl_model._load_weights(model_id, adapter_name)
        return fl_model

    def load_adapter(self, model_id: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in ``model_id`` under the name ``adapter_name`` (inactive, like ``add_adapter``)."""
        config = FLTuningConfig.from_pretrained(model_id).replace(inference_mode=not is_trainable)
        self.add_adapter(adapter_name, config)
        try:
            self._load_weights(model_id, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def _load_weights(self, model_id: str | Path, adapter_name: str) -> None:
        directory = Path(model_id)
        recorded = read_config_json(directory).get("base_ffn")
        if recorded is not None:
            expected = self._base_ffn(adapter_name)
            mismatched = {
                p: (s, expected["projections"].get(p))
                for p, s in recorded["projections"].items()
                if expected["projections"].get(p) != s
            }
            if mismatched or set(recorded["projections"]) != set(expected["projections"]):
                some = dict(list(mismatched.items())[:3])
                raise AdapterLoadError(
                    f"{directory} was made for a base whose FFN shapes differ from this model's "
                    f"({recorded.get('model_type')} vs {expected['model_type']}; [in, width, out] saved vs here: "
                    f"{some or 'different projections'}); load it onto the base model it was trained on"
                )
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise AdapterLoadError(f"{path} is missing; the adapter folder is incomplete")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterLoadError(f"{path} is corrupt or not a safetensors file ({err})") from err
        own = self.adapter_state_dict(adapter_name)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise AdapterLoadError(
                f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, target in own.items():
            if state[key].shape != target.shape:
                raise AdapterLoadError(
                    f"{path}: {key} has shape {tuple(state[key].shape)}, model needs {tuple(target.shape)}"
                )
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(state[key])


def _projection_width(block: FFNBlock) -> int:
    """The FFN width (hidden units) of a block, read off its up projection, merged units included."""
    module = block.projections["up"][1]
    return module.ffn_width if isinstance(module, FLProjection) else weight_out_in(module).shape[0]


def get_fl_model(model: nn.Module, config: FLTuningConfig, adapter_name: str = "default") -> FLModel:
    """Freeze ``model`` and inject FL-tuning units as ``config`` says; returns the wrapper to train."""
    return FLModel(model, config, adapter_name)
