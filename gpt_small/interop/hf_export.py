"""`gpt-small export`: a checkpoint as a Hugging Face transformers folder.

The folder loads with `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
and computes the same logits as our model (fp32, to rounding). Which transformers class holds the
model depends on what it uses:

  gpt2       learned or sinusoidal positions, no QK-norm, no n-grams -> `GPT2LMHeadModel`.
             The sinusoidal table is written as GPT-2's position table; our token embeddings are
             scaled by sqrt(n_embd) before it is added, so the exported `wte` is pre-scaled and the
             head (the unscaled matrix) is written untied. Missing biases become zeros.
  gpt_neox   rotary positions, no QK-norm, no n-grams -> `GPTNeoXForCausalLM` with rotary over the
             whole head (rotary_pct 1), sequential residual, LayerNorm. Its rotation is the same
             half-split pairing as ours; only the fused qkv rows are reordered from our [q | k | v]
             to its per-head [q_h k_h v_h].
  gpt_small  anything else (hashed n-gram tables, QK-norm): our parameter names and layout, with
             `modeling_gpt_small.py` + `configuration_gpt_small.py` beside them and `auto_map` in
             config.json; load with `trust_remote_code=True`. Those files import only torch and
             transformers.

Beside the weights: the tokenizer (hf_tokenizer.py), generation_config.json (our sampling
defaults; a char model's `<unk>` is never generated, as in `gpt-small generate`), and README.md,
a model card (model_card.py). Every file is written through fileio.atomic_write (mode 0666 minus
the umask, as checkpoints) into a hidden `.OUT.tmp-PID-RANDOM` folder (0777 minus the umask), which
is renamed into place; a folder left by an export killed mid-way (its pid no longer alive) is
swept by the next export into the same parent folder.

Past `block_size` tokens `gpt-small generate` slides its window, which GPT-2 cannot (its position
table ends there: transformers raises IndexError) and GPT-NeoX does not do (it goes on rotating,
into positions it never trained on). generation_config.json caps those exports at `block_size`
tokens, but an explicit `max_new_tokens` overrides `max_length` in transformers, so the model card's
snippet asks for no more than the context holds. The gpt_small code slides as ours does.

`target` names the runtime the folder is for; for vllm and llama.cpp, a model that runtime would
compute differently from ours is refused in one line that names the runtime (runtime_trap).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from ..checkpoint import Checkpoint, load_checkpoint
from ..config import GPTConfig
from ..errors import GPTSmallError
from ..fileio import atomic_write, fsync_dir, write_error
from ..positional import sinusoidal_table
from ..tokenizer import CharTokenizer, Tokenizer
from .hf_tokenizer import eos_token, write_tokenizer

REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_gpt_small.py", "modeling_gpt_small.py")
HF_ACTIVATION = {"relu": "relu", "gelu": "gelu_new", "relu2": "relu2"}  # names in transformers' ACT2FN
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which our model uses
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel (standard transformers; no remote code)",
    "gpt_neox": "GPTNeoXForCausalLM (standard transformers; no remote code)",
    "gpt_small": "GPTSmallForCausalLM (our modeling_gpt_small.py: load with trust_remote_code=True)",
}
TARGETS = ("transformers", "vllm", "llama.cpp")
DEFAULT_TEMPERATURE = 0.8  # gpt-small generate's default, written to generation_config.json


@dataclass(kw_only=True)
class ExportResult:
    out: Path  # the folder written
    architecture: str  # gpt2, gpt_neox or gpt_small
    reason: str  # why that architecture


def choose_architecture(cfg: GPTConfig) -> tuple[str, str]:
    """(architecture, reason): the most standard transformers class that computes our model exactly."""
    unusual = [what for what, on in (("hashed n-gram input tables", cfg.ngram > 1), ("QK-norm", cfg.qk_norm)) if on]
    if unusual:
        return "gpt_small", f"{' and '.join(unusual)}: no standard transformers architecture has them"
    if cfg.pos_encoding == "rope":
        return "gpt_neox", "rotary positions: GPT-NeoX with rotary over the whole head and sequential residual"
    return "gpt2", f"{cfg.pos_encoding} positions: GPT-2 (the position table as its wpe)"


def runtime_trap(cfg: GPTConfig, tok: Tokenizer, architecture: str, target: str) -> str | None:
    """Why `target` would compute this export differently from gpt-small (None: it would not).

    vLLM's GPT-2 always ties the head to wte; llama.cpp's converter (convert_hf_to_gguf.py) writes
    neither the activation nor n_inner of a GPT-2 (its graphs compute GELU with a 4x MLP), knows no
    remote code, and refuses a BPE whose pre-tokenizer it does not recognise by hash."""
    if target == "vllm":
        if architecture == "gpt_small":
            return "vLLM has no GPTSmallForCausalLM (needed for n-gram tables and QK-norm)"
        if architecture == "gpt2" and not (cfg.tie_embeddings and cfg.pos_encoding != "sinusoidal"):
            why = ("sinusoidal positions are exported with a pre-scaled wte and a separate head"
                   if cfg.pos_encoding == "sinusoidal" else "this model's head is untied")
            return f"vLLM's GPT-2 ties the head to the token embeddings, and {why}"
    elif target == "llama.cpp":
        if architecture == "gpt_small":
            return "llama.cpp's convert_hf_to_gguf.py has no GPTSmallForCausalLM (n-gram tables, QK-norm)"
        if cfg.activation != "gelu":
            return f"llama.cpp's GPT-2 and GPT-NeoX graphs compute GELU, whatever config.json says ({cfg.activation})"
        if architecture == "gpt2" and cfg.mlp_ratio != 4:
            return f"llama.cpp's GPT-2 conversion writes a 4x MLP width, this model's is {cfg.mlp_ratio}x"
        if tok.kind != "gpt2":
            return (f"llama.cpp's convert_hf_to_gguf.py converts only BPE tokenizers it recognises, "
                    f"such as GPT-2's; this model's is {tok.kind}")
    return None


def _bias(sd: dict[str, torch.Tensor], name: str, n: int) -> torch.Tensor:
    return sd[name] if name in sd else torch.zeros(n)


def gpt2_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """GPT2LMHeadModel weights of our model, and whether the head is tied to wte."""
    cfg: GPTConfig = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    C, H = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
    out: dict[str, torch.Tensor] = {}
    wte = sd["transformer.wte.weight"]
    if cfg.pos_encoding == "sinusoidal":
        out["transformer.wte.weight"] = wte * model._emb_scale  # what our forward multiplies by
        out["transformer.wpe.weight"] = sinusoidal_table(cfg.block_size, C)
    else:
        out["transformer.wte.weight"] = wte
        out["transformer.wpe.weight"] = sd["transformer.wpe.weight"]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = sd[p + ln + ".weight"]
            out[p + ln + ".bias"] = _bias(sd, p + ln + ".bias", C)
        for lin, n_out in (("attn.c_attn", 3 * C), ("attn.c_proj", C), ("mlp.c_fc", H), ("mlp.c_proj", C)):
            out[p + lin + ".weight"] = sd[p + lin + ".weight"].t()  # Conv1D stores (in, out)
            out[p + lin + ".bias"] = _bias(sd, p + lin + ".bias", n_out)
    out["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"]
    out["transformer.ln_f.bias"] = _bias(sd, "transformer.ln_f.bias", C)
    tied = cfg.tie_embeddings and cfg.pos_encoding != "sinusoidal"
    if not tied:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out, tied


def gpt2_config(cfg: GPTConfig, tied: bool, eos_id: int | None) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.mlp_ratio * cfg.n_embd,
        "activation_function": HF_ACTIVATION[cfg.activation], "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": tied, "bos_token_id": eos_id, "eos_token_id": eos_id, "use_cache": True,
    }


def neox_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GPTNeoXForCausalLM weights of our rotary model."""
    cfg: GPTConfig = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    C, H, nh, hs = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, cfg.n_head, cfg.head_size
    out = {"gpt_neox.embed_in.weight": sd["transformer.wte.weight"]}
    if not cfg.tie_embeddings:  # tied: transformers ties embed_out to embed_in itself
        out["embed_out.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}.", f"gpt_neox.layers.{i}."
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[q + theirs + ".weight"] = sd[p + ours + ".weight"]
            out[q + theirs + ".bias"] = _bias(sd, p + ours + ".bias", C)
        # ours: rows [q (nh*hs) | k | v]; GPT-NeoX views its output as (nh, 3*hs): [q_h k_h v_h] per head
        w = sd[p + "attn.c_attn.weight"]
        out[q + "attention.query_key_value.weight"] = w.view(3, nh, hs, C).transpose(0, 1).reshape(3 * C, C)
        out[q + "attention.dense.weight"] = sd[p + "attn.c_proj.weight"]
        if cfg.bias:  # attention_bias=False: GPT-NeoX has none there either
            b = sd[p + "attn.c_attn.bias"]
            out[q + "attention.query_key_value.bias"] = b.view(3, nh, hs).transpose(0, 1).reshape(3 * C)
            out[q + "attention.dense.bias"] = sd[p + "attn.c_proj.bias"]
        out[q + "mlp.dense_h_to_4h.weight"] = sd[p + "mlp.c_fc.weight"]
        out[q + "mlp.dense_h_to_4h.bias"] = _bias(sd, p + "mlp.c_fc.bias", H)  # always present in GPT-NeoX
        out[q + "mlp.dense_4h_to_h.weight"] = sd[p + "mlp.c_proj.weight"]
        out[q + "mlp.dense_4h_to_h.bias"] = _bias(sd, p + "mlp.c_proj.bias", C)
    out["gpt_neox.final_layer_norm.weight"] = sd["transformer.ln_f.weight"]
    out["gpt_neox.final_layer_norm.bias"] = _bias(sd, "transformer.ln_f.bias", C)
    return out


def neox_config(cfg: GPTConfig, eos_id: int | None) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0}
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "intermediate_size": cfg.mlp_ratio * cfg.n_embd,
        "hidden_act": HF_ACTIVATION[cfg.activation], "max_position_embeddings": cfg.block_size,
        # rope_parameters for transformers 5, rotary_pct / rotary_emb_base for 4.x
        "rope_parameters": rope, "rotary_pct": 1.0, "rotary_emb_base": cfg.rope_theta,
        "use_parallel_residual": False, "layer_norm_eps": LAYER_NORM_EPS, "attention_bias": cfg.bias,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "use_cache": True,
    }


def gpt_small_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:  # the head is wte itself, under both names in the state dict
        del sd["lm_head.weight"]
    return sd


def gpt_small_config(cfg: GPTConfig, eos_id: int | None) -> dict:
    fields = {k: v for k, v in cfg.to_dict().items() if k != "dropout"}
    return {
        "architectures": ["GPTSmallForCausalLM"], "model_type": "gpt_small",
        "auto_map": {"AutoConfig": "configuration_gpt_small.GPTSmallConfig",
                     "AutoModelForCausalLM": "modeling_gpt_small.GPTSmallForCausalLM"},
        **fields, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eos_id, "eos_token_id": eos_id,
        "use_cache": False,
    }


def generation_config(ckpt: Checkpoint, architecture: str) -> dict:
    """Our `generate` defaults (temperature 0.8, no top-k / top-p), and the tokenizer's EOS, at
    which transformers stops (GPT-2's `<|endoftext|>`; `gpt-small generate` does not stop there)."""
    cfg = ckpt.model.config
    eos = eos_token(ckpt.tokenizer)
    eos_id = eos[1] if eos else None
    gen = {"do_sample": True, "temperature": DEFAULT_TEMPERATURE, "top_k": None, "top_p": None,
           "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    if architecture == "gpt_small":
        gen["use_cache"] = False  # the remote code recomputes the window; it slides past block_size
    else:
        gen["max_length"] = cfg.block_size  # GPT-2's table ends there; GPT-NeoX would not slide as we do
    if isinstance(ckpt.tokenizer, CharTokenizer):
        gen["bad_words_ids"] = [[ckpt.tokenizer.unk_id]]  # `<unk>` stands for no character: never sampled
    return gen


STALE_EXPORT = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")  # .OUT.tmp-PID-RANDOM, as export names them


def sweep_stale_exports(parent: Path) -> None:
    """Remove the `.OUT.tmp-PID-RANDOM` folders in `parent` whose export process is gone (killed
    mid-way), whatever OUT was. A folder whose pid is alive belongs to an export still running."""
    try:
        siblings = list(parent.iterdir())
    except OSError:
        return
    for d in siblings:
        m = STALE_EXPORT.match(d.name)
        if m and d.is_dir() and not d.is_symlink() and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32",
                      prefer: str = "best", evaluate: bool = True, target: str = "transformers") -> ExportResult:
    """Write `checkpoint` (a run folder or checkpoint folder) as a transformers folder at `out`.

    evaluate: let the model card score the whole validation split when the run recorded no
    figure for this step (model_card.py); False writes "not measured" instead.
    target: transformers (any model), or vllm / llama.cpp, which refuse what that runtime would
    compute differently (runtime_trap)."""
    from .model_card import model_card

    if dtype not in EXPORT_DTYPES:
        raise GPTSmallError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if target not in TARGETS:
        raise GPTSmallError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    out = Path(out)
    sweep_stale_exports(out.parent)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GPTSmallError(f"{out} already exists and is not empty; choose another --out")
    ckpt = load_checkpoint(checkpoint, prefer=prefer)
    model, cfg = ckpt.model.eval(), ckpt.model.config
    architecture, reason = choose_architecture(cfg)
    trap = runtime_trap(cfg, ckpt.tokenizer, architecture, target)
    if trap:
        raise GPTSmallError(f"cannot export for {target}: {trap}; export without --target for transformers")
    eos = eos_token(ckpt.tokenizer)
    eos_id = eos[1] if eos else None
    if architecture == "gpt2":
        state, tied = gpt2_state(model)
        config = gpt2_config(cfg, tied, eos_id)
    elif architecture == "gpt_neox":
        state, config = neox_state(model), neox_config(cfg, eos_id)
    else:
        state, config = gpt_small_state(model), gpt_small_config(cfg, eos_id)
    config["dtype"] = config["torch_dtype"] = dtype  # transformers 5 reads dtype, 4.x torch_dtype
    config["gpt_small"] = {"step": ckpt.meta.get("step"), "gpt_small_version": ckpt.meta.get("gpt_small_version"),
                           "model": cfg.to_dict()}
    state = {k: v.to(EXPORT_DTYPES[dtype]).contiguous() for k, v in state.items()}
    generation = generation_config(ckpt, architecture)
    card = model_card(ckpt, architecture=architecture, reason=reason, dtype=dtype, evaluate=evaluate)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out.parent, e) from None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        try:
            tmp.mkdir()  # 0777 minus the umask, as a checkpoint folder (mkdtemp would make it 0700)
        except OSError as e:
            raise write_error(out, e) from None
        try:
            atomic_write(tmp / "model.safetensors", safetensors_bytes(state, metadata={"format": "pt"}))
            atomic_write(tmp / "config.json", json.dumps(config, indent=2) + "\n")
            atomic_write(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
            write_tokenizer(ckpt.tokenizer, tmp, cfg.block_size)
            if architecture == "gpt_small":
                for name in REMOTE_FILES:
                    atomic_write(tmp / name, (REMOTE_DIR / name).read_bytes())
            atomic_write(tmp / "README.md", card)
        except GPTSmallError as e:  # name the folder the user asked for, not its temporary name
            raise GPTSmallError(str(e).replace(str(tmp), str(out))) from None
        try:
            if out.exists():
                out.rmdir()  # empty (checked above)
            tmp.rename(out)
        except OSError as e:
            raise write_error(out, e) from None
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out=out, architecture=architecture, reason=reason)
