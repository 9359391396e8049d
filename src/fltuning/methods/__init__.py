"""Tuning methods behind one interface (``fltuning.methods.base``); importing this package registers them all."""

from fltuning.methods import finetune, fl, lora, prompt_tuning, ptuning_v2  # noqa: F401
