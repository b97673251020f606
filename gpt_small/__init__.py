"""gpt-small: train, evaluate and sample GPT-style language models."""

__version__ = "0.1.0"
