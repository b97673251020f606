"""Generation throughput: our cached greedy decoding, with fp32, bf16 and int8 weights, against
Hugging Face GPT-2's `generate` in fp32.

Not a test. Both models hold the same weights (ours copied into a GPT2LMHeadModel built from a
local GPT2Config, no download), run in the same process on the CPU with torch's default thread
count, and decode greedily from the same random prompts. For each shape and batch size it prints
new tokens per second (prompt processing included, for both), the median of --reps alternating
runs after one warm-up (ours fp32, ours bf16, ours int8, HF, ours fp32, ...), the ratios, and
whether our fp32 greedy tokens equal HF's (a strong check that the two compute the same model);
for bf16 and int8, the first step where their greedy tokens leave fp32's ("=" if never: random
weights give near-tied logits, so an early departure says little about a trained model; the
quality figure is `gpt-small eval --weights`, docs/decoding.md). Last, ours alone for the
`poem-cpu` preset, which GPT2LMHeadModel cannot express (RoPE, n-gram tables).

    python benchmarks/generate_throughput.py [--reps 3] [--gpt2] [--only gpt2-124m] [--weights ...]
                                             [--profile] [--threads N]

--gpt2 adds GPT-2 small (124M) at batch 1, 100 new tokens (slow on two cores); --only runs the
named shapes alone. --weights picks our weight kinds (default all three). --profile prints a
torch.profiler table of our decode loop for the first shape.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

from gpt_small import ops
from gpt_small.config import GPTConfig
from gpt_small.generate import generate_tokens
from gpt_small.model import GPT
from gpt_small.ops.quantize import WEIGHTS, convert_weights

PROMPT_LEN = 16


def hf_twin(model: GPT):
    """The same network as a transformers GPT2LMHeadModel, with our weights copied in."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    assert c.activation == "gelu" and c.pos_encoding == "learned" and c.bias and c.tie_embeddings
    hf_config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None,  # no early stop: both sides make every token
    )
    hf = GPT2LMHeadModel(hf_config).eval()
    # HF's Conv1D stores (in, out); our nn.Linear stores (out, in).
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: (v.t() if k.endswith(transposed) else v) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    hf.tie_weights()
    return hf


def ours_generate(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack(list(generate_tokens(model, idx, max_new_tokens=n, temperature=0)), dim=1)


def hf_generate(hf, idx: torch.Tensor, n: int) -> torch.Tensor:
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                      min_new_tokens=n, use_cache=True, pad_token_id=0)
    return out[:, idx.shape[1]:]


def median_seconds(fns: dict, reps: int) -> dict[str, tuple[float, torch.Tensor]]:
    """Median wall time and output of each function; runs alternate (ours, HF, ours, ...) so that
    a change in machine load during the benchmark hits both sides alike."""
    outs = {name: fn() for name, fn in fns.items()}  # warm-up: first-call allocations, kernel choice
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(times[name]), outs[name]) for name in fns}


def profile_decode(model: GPT, n: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    idx = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN))
    ours_generate(model, idx, n)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours_generate(model, idx, n)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


SHORT = {"float32": "fp32", "bfloat16": "bf16", "int8": "int8"}


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    return "=" if torch.equal(a, b) else str(int((a != b).any(0).nonzero()[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--gpt2", action="store_true", help="also GPT-2 small (124M), batch 1")
    parser.add_argument("--only", help="comma-separated shape names to run alone (e.g. gpt2-124m,poem-cpu)")
    parser.add_argument("--weights", default=",".join(WEIGHTS), help="our weight kinds, comma-separated")
    parser.add_argument("--profile", action="store_true", help="profile our decode loop")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = args.weights.split(",")
    assert kinds[0] == "float32" and set(kinds) <= set(WEIGHTS), "--weights: float32 first, then bfloat16/int8"

    base = dict(activation="gelu", pos_encoding="learned", bias=True, tie_embeddings=True, dropout=0.0)
    cases = [  # (name, config, batch sizes, new tokens)
        ("4L/4H/128 V128", GPTConfig(vocab_size=128, block_size=256, n_layer=4, n_head=4, n_embd=128, **base),
         (1, 8), 200),
        ("6L/6H/384 V128", GPTConfig(vocab_size=128, block_size=256, n_layer=6, n_head=6, n_embd=384, **base),
         (1, 8), 200),
    ]
    only = args.only.split(",") if args.only else None
    if args.gpt2 or (only and "gpt2-124m" in only):
        cases.append(("gpt2-124m", GPTConfig.from_preset("gpt2-124m", **base), (1,), 100))
    if only:
        cases = [c for c in cases if c[0] in only or c[0].split()[0] in only]

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads of {os.cpu_count()} CPUs "
          f"(load average {load:.1f}), {platform.machine()}, greedy, prompt {PROMPT_LEN} tokens, "
          f"median of {args.reps}; HF in fp32; ratios against our fp32 (x32) and HF (xHF)")
    print(ops.describe())
    header = f"{'shape':<16}{'batch':>6}{'new':>5}{'HF tok/s':>10}{'fp32 tok/s':>12}{'xHF':>7}"
    for kind in kinds[1:]:
        header += f"{SHORT[kind] + ' tok/s':>12}{'x32':>7}{'xHF':>7}"
    header += "  same tokens (fp32 = HF; others: first step off fp32)"
    print(header)
    print("-" * len(header))
    for name, config, batches, n in cases:
        torch.manual_seed(0)
        model = GPT(config).eval()
        hf = hf_twin(model)
        models = {kind: convert_weights(copy.deepcopy(model), kind) for kind in kinds}
        if args.profile and name == cases[0][0]:
            profile_decode(model, n)
        for B in batches:
            idx = torch.randint(0, config.vocab_size, (B, PROMPT_LEN), generator=torch.Generator().manual_seed(B))
            fns = {kind: (lambda m=m: ours_generate(m, idx, n)) for kind, m in models.items()}
            fns["hf"] = lambda: hf_generate(hf, idx, n)
            timed = median_seconds(fns, args.reps)
            tps = {k: B * n / t for k, (t, _) in timed.items()}
            toks = {k: tok for k, (_, tok) in timed.items()}
            same = "yes" if torch.equal(toks["float32"], toks["hf"]) else (
                f"MISMATCH from step {first_difference(toks['float32'], toks['hf'])}")
            line = f"{name:<16}{B:>6}{n:>5}{tps['hf']:>10.0f}{tps['float32']:>12.0f}{tps['float32'] / tps['hf']:>6.2f}x"
            for kind in kinds[1:]:
                line += f"{tps[kind]:>12.0f}{tps[kind] / tps['float32']:>6.2f}x{tps[kind] / tps['hf']:>6.2f}x"
                same += f", {SHORT[kind]} {first_difference(toks[kind], toks['float32'])}"
            print(f"{line}  {same}", flush=True)
    # The CPU preset itself (RoPE, relu², QK-norm, untied head, 6-gram tables) has no GPT2LMHeadModel
    # twin; the 4x128 rows above are its shape in GPT-2's architecture. Ours alone.
    if only and "poem-cpu" not in only:
        return
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("poem-cpu", vocab_size=128)).eval()
    models = {kind: convert_weights(copy.deepcopy(model), kind) for kind in kinds}
    for B in (1, 8):
        idx = torch.randint(0, 128, (B, PROMPT_LEN), generator=torch.Generator().manual_seed(B))
        timed = median_seconds({kind: (lambda m=m: ours_generate(m, idx, 200)) for kind, m in models.items()},
                               args.reps)
        tps = {k: B * 200 / t for k, (t, _) in timed.items()}
        line = f"{'poem-cpu preset':<16}{B:>6}{200:>5}{'-':>10}{tps['float32']:>12.0f}{'-':>7}"
        same = "(no HF twin)"
        for kind in kinds[1:]:
            line += f"{tps[kind]:>12.0f}{tps[kind] / tps['float32']:>6.2f}x{'-':>7}"
            same += f", {SHORT[kind]} {first_difference(timed[kind][1], timed['float32'][1])}"
        print(f"{line}  {same}", flush=True)


if __name__ == "__main__":
    main()
