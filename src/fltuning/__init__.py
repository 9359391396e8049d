"""fltuning: FL-tuning (Liu et al., arXiv 2206.15312) for Hugging Face Transformers.

FFN'(x) = act(x W1 + b1) W2 + b2 + act(x U1 + c1) U2 + c2: k extra hidden units in every feed-forward block; only
U1, c1, U2, c2 (and a task head) train, and a tuned model merges exactly into a plain checkpoint whose FFN is k wider.
"""

__version__ = "0.1.0"

from fltuning.config import ConfigError, FLTuningConfig  # noqa: E402
from fltuning.layers import MergeError  # noqa: E402
from fltuning.model import AdapterLoadError, FLModel, get_fl_model  # noqa: E402

__all__ = ["AdapterLoadError", "ConfigError", "FLModel", "FLTuningConfig", "MergeError", "get_fl_model", "__version__"]
