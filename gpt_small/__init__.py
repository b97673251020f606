"""gpt-small: train, evaluate and sample GPT-style language models.

`from gpt_small import GPT, GPTConfig`. Torch-backed names load lazily, so that the CLI's `info`
and config checks do not pay for importing torch.
"""

from .config import GPTConfig, TrainConfig

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "TrainConfig", "__version__"]


def __getattr__(name: str):
    if name == "GPT":
        from .model import GPT

        return GPT
    raise AttributeError(f"module 'gpt_small' has no attribute {name!r}")
