"""`gpt-small import`: a local Hugging Face GPT2LMHeadModel folder as a gpt-small checkpoint.

Reads config.json and the weights (model.safetensors, sharded safetensors with their index, or
pytorch_model.bin through `torch.load(weights_only=True)`) of any GPT-2 size, and writes a run
folder whose `last` checkpoint is our GPT with learned positions, biases, GELU (tanh form, GPT-2's
"gelu_new"), the head tied as the config says (GPT-2's is), and the `gpt2` tokenizer. The logits
equal transformers' to rounding.

Only what maps exactly is accepted; anything else is refused in one line: other architectures,
a vocabulary other than GPT-2's 50,257 tokens, tokenizer files that are not GPT-2's, a tied head
whose weights hold another lm_head (transformers' versions differ on which one counts), attention
not scaled by 1/sqrt(head size) or scaled by layer index, cross-attention, a LayerNorm epsilon
other than 1e-5 (torch's default, which our model uses), an MLP width that is not a whole multiple
of n_embd. ReLU and squared-ReLU GPT-2s (our own exports) import too, so export(import(x)) == x.
Nothing here imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..checkpoint import save_checkpoint
from ..config import GPTConfig
from ..errors import GPTSmallError
from ..tokenizer import GPT2_VOCAB, gpt2_tokenizer

FROM_HF_ACTIVATION = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "relu2": "relu2"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older GPT-2 files


@dataclass(kw_only=True)
class ImportResult:
    out: Path  # the run folder written
    config: GPTConfig
    weights: Path  # the file read (the index for sharded safetensors)
    notes: list[str]  # things the user should know (no tokenizer files found, ...)


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise GPTSmallError(f"{directory} has no config.json: not a transformers model folder")
    from ..schemas import HFConfig, read_json

    return read_json(path, HFConfig)  # sizes strict positive ints, within limits.py's maximums


def gpt_config_of(hf: dict[str, Any], directory: Path) -> GPTConfig:
    """Our GPTConfig for a GPT-2 config.json, or a one-line refusal naming what does not map."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "gpt2" or (archs and "GPT2LMHeadModel" not in archs):
        what = ", ".join(archs) or hf.get("model_type") or "unknown"
        raise GPTSmallError(f"{directory} holds a {what} model; gpt-small imports GPT2LMHeadModel folders only")
    n_embd = hf.get("n_embd", 768)
    checks = [
        (hf.get("vocab_size", GPT2_VOCAB) == GPT2_VOCAB,
         f"vocab_size {hf.get('vocab_size')} is not GPT-2's {GPT2_VOCAB} (the gpt2 tokenizer would not fit)"),
        (hf.get("activation_function", "gelu_new") in FROM_HF_ACTIVATION,
         f"activation_function {hf.get('activation_function')!r} is none of {', '.join(FROM_HF_ACTIVATION)}"),
        (hf.get("scale_attn_weights", True), "scale_attn_weights=false (unscaled attention)"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
        (not hf.get("add_cross_attention", False), "add_cross_attention=true"),
        (hf.get("layer_norm_epsilon", 1e-5) == 1e-5, f"layer_norm_epsilon {hf.get('layer_norm_epsilon')} (ours is 1e-5)"),
        (hf.get("n_inner") is None or hf["n_inner"] % n_embd == 0,
         f"n_inner {hf.get('n_inner')} is not a multiple of n_embd {n_embd}"),
    ]
    for ok, what in checks:
        if not ok:
            raise GPTSmallError(f"{directory}: {what}; gpt-small cannot compute this GPT-2 exactly")
    return GPTConfig(
        vocab_size=GPT2_VOCAB, block_size=hf.get("n_positions", 1024), n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12), n_embd=n_embd, dropout=0.0, bias=True,
        activation=FROM_HF_ACTIVATION[hf.get("activation_function", "gelu_new")],
        mlp_ratio=(hf.get("n_inner") or 4 * n_embd) // n_embd, pos_encoding="learned",
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of a transformers folder, float32, and the file it came from."""
    single, index, bin_ = directory / "model.safetensors", directory / "model.safetensors.index.json", \
        directory / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(str(single)), single
        if index.is_file():
            from ..schemas import ShardIndex, read_json

            # every shard a file name inside `directory` (a `../other/x.safetensors` is refused)
            shards = sorted(set(read_json(index, ShardIndex)["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (directory / shard).resolve().is_relative_to(directory.resolve()):  # a link out
                    raise GPTSmallError(f"{index}: shard {shard!r} lies outside {directory}")
                sd.update(load_file(str(directory / shard)))
            return sd, index
        if bin_.is_file():
            import warnings

            with warnings.catch_warnings():  # torch's warning about a foreign pickle would be a second line
                warnings.simplefilter("ignore")
                sd = torch.load(bin_, map_location="cpu", weights_only=True)  # tensors only: runs no code
            if not isinstance(sd, dict):
                raise GPTSmallError(f"{bin_} does not hold a state dict")
            return sd, bin_
    except GPTSmallError:
        raise
    except Exception as e:  # a pickle that weights_only refuses, a truncated file, a Rust error
        from ..errors import one_line

        raise GPTSmallError(f"cannot read the weights in {directory}: {one_line(e)}") from None
    raise GPTSmallError(f"{directory} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def our_state(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel names and layout -> ours (Conv1D weights transposed)."""
    out = {}
    for name, t in sd.items():
        if name.endswith(_BUFFERS):
            continue
        if not name.startswith(("transformer.", "lm_head.")):  # files saved from GPT2Model
            name = "transformer." + name
        t = t.float()
        out[name] = t.t().contiguous() if name.endswith(_CONV1D) else t
    head, wte = out.get("lm_head.weight"), out.get("transformer.wte.weight")
    if not cfg.tie_embeddings and head is None:
        raise GPTSmallError("the config says the head is untied but the weights hold no lm_head.weight")
    if cfg.tie_embeddings and head is not None and wte is not None and not torch.equal(head, wte):
        # older transformers tie them (the head becomes wte); transformers 5 keeps the file's head
        raise GPTSmallError("the config says the head is tied but the weights hold an lm_head.weight other than "
                            "wte; set tie_word_embeddings in config.json to say which head the model has")
    return out


def check_tokenizer_files(directory: Path) -> list[str]:
    """Refuse tokenizer files that are not GPT-2's; a note if there are none."""
    ours = gpt2_tokenizer().hf.get_vocab()
    tok_json, vocab_json = directory / "tokenizer.json", directory / "vocab.json"
    if tok_json.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            vocab = HFTokenizer.from_file(str(tok_json)).get_vocab()
        except Exception as e:  # tokenizers raises its own exception type for bad JSON
            raise GPTSmallError(f"{tok_json} is unreadable: {e}") from None
        vocab = {k: v for k, v in vocab.items() if v < GPT2_VOCAB}  # added tokens (a pad) beyond the table
    elif vocab_json.is_file():
        from ..schemas import read_json

        vocab = read_json(vocab_json)  # unreadable or not JSON: one line naming the file
    else:
        return [f"{directory} has no tokenizer.json or vocab.json; assuming GPT-2's tokenizer"]
    if vocab != ours:
        raise GPTSmallError(f"the tokenizer in {directory} is not GPT-2's; gpt-small imports GPT-2 models with "
                            "GPT-2's tokenizer only")
    return []


def import_gpt2(hf_dir: str | Path, out: str | Path) -> ImportResult:
    """Write the GPT-2 folder `hf_dir` as a gpt-small run folder `out` (step 0, `last` and `best`)."""
    from ..model import GPT

    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise GPTSmallError(f"{hf_dir} is not a folder")
    if any((out / name).exists() or (out / name).is_symlink() for name in ("last", "best")):
        raise GPTSmallError(f"{out} already holds a checkpoint; choose another --out")
    cfg = gpt_config_of(read_hf_config(hf_dir), hf_dir)
    notes = check_tokenizer_files(hf_dir)
    from .. import limits

    limits.check_fits(limits.model_bytes(cfg.num_params()), f"the model in {hf_dir} ({cfg.num_params():,} parameters)")
    sd, source = read_hf_weights(hf_dir)
    model = GPT(cfg)
    state = our_state(sd, cfg)
    if cfg.tie_embeddings and "transformer.wte.weight" in state:  # else "missing" below names it
        state["lm_head.weight"] = state["transformer.wte.weight"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of other shapes than config.json says: torch lists them under a header
        first = str(e).splitlines()[1].strip()  # the first: a weight of the file (the last can be the tied head)
        raise GPTSmallError(f"the weights in {source} do not fit its config.json: {first}") from None
    if missing or unexpected:
        raise GPTSmallError(f"the weights in {source} do not fit its config.json: missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}")
    save_checkpoint(out, step=0, model=model, tokenizer=gpt2_tokenizer(),
                    config={"model": cfg.to_dict(), "imported_from": str(hf_dir.resolve()), "data": None,
                            "val_loss": None},
                    links=("last", "best"))
    return ImportResult(out=out, config=cfg, weights=source, notes=notes)
