"""fltuning: FL-tuning (Liu et al., arXiv 2206.15312) for Hugging Face Transformers."""

__version__ = "0.1.0"
