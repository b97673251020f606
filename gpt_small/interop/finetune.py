"""`gpt-small train --init-from RUN`: a new run that starts from a checkpoint's weights.

Full fine-tuning: every weight trains. Only the weights come from the checkpoint; the step, the
optimizer state, the schedule, the data position and the RNG start afresh (a new run, not a
resume). The model's shape is the checkpoint's: flags and `--set` keys may repeat it but not
change it, except `dropout`, which is training behaviour, not shape. The data must have been
prepared with the checkpoint's tokenizer (`gpt-small prepare --tokenizer gpt2` for an imported
GPT-2); otherwise one line says which tokenizer each has.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..checkpoint import checkpoint_model_config, find_checkpoint
from ..config import GPTConfig, parse_value
from ..errors import GPTSmallError
from ..tokenizer import Tokenizer, load_tokenizer, same_tokenizer

NOT_SHAPE = ("dropout",)  # model fields a fine-tuning run may change


def _describe(tok: Tokenizer) -> str:
    return f"the {tok.kind} tokenizer ({tok.vocab_size:,} tokens)"


def init_from_config(init_from: str | Path, *, data_tokenizer: Tokenizer, data_dir: str | Path,
                     model_overrides: dict[str, Any]) -> tuple[Path, GPTConfig]:
    """(checkpoint folder, model config) for a run that starts from `init_from` (a run folder: its
    best checkpoint; or a checkpoint folder). model_overrides: the model fields the user set."""
    ckpt = find_checkpoint(init_from, prefer="best")
    cfg = checkpoint_model_config(ckpt)
    ckpt_tok = load_tokenizer(ckpt)
    if not same_tokenizer(ckpt_tok, data_tokenizer):
        raise GPTSmallError(f"--init-from: the data in {data_dir} was prepared with {_describe(data_tokenizer)}, the "
                            f"checkpoint {ckpt} uses {_describe(ckpt_tok)}; prepare the data with "
                            f"--tokenizer {ckpt_tok.kind}" + (" and the same vocabulary" if ckpt_tok.kind != "gpt2" else ""))
    changes = {}
    for key, raw in model_overrides.items():
        value = parse_value(GPTConfig, key, raw)
        if key in NOT_SHAPE:
            changes[key] = value
        elif value != getattr(cfg, key):
            raise GPTSmallError(f"--init-from takes the model's shape from {ckpt}: {key}={value!r} differs from its "
                                f"{getattr(cfg, key)!r} (only {', '.join(NOT_SHAPE)} may change)")
    return ckpt, dataclasses.replace(cfg, **changes)
