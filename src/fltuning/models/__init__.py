"""Real pretrained weights offline (e5-small, minilm-l6, smollm2-135m) next to any hub id or local folder.

    from fltuning.models import resolve_model
    path = resolve_model("e5-small")        # built once into $FLTUNING_CACHE/models/e5-small, then reused
    model = AutoModel.from_pretrained(path)

``resolve_model`` also accepts a local folder (returned as is) or a hub id such as ``hfl/chinese-roberta-wwm-ext``
(returned unchanged). This package imports neither torch nor transformers itself; they load when a model is built.
"""

from fltuning.models.cache import CACHE_ENV, cache_root, models_dir
from fltuning.models.errors import ModelError
from fltuning.models.registry import REGISTRY, ModelInfo, ModelSpec, list_models, prepare_model, resolve_model

__all__ = [
    "CACHE_ENV",
    "REGISTRY",
    "ModelError",
    "ModelInfo",
    "ModelSpec",
    "cache_root",
    "list_models",
    "models_dir",
    "prepare_model",
    "resolve_model",
]
