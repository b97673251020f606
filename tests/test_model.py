"""The GPT against references: Hugging Face's GPT-2 logits, the closed-form parameter count, causal
masking, cached decoding equal to the uncached forward, a safetensors round trip, and a tiny model
that memorises one batch. All on the CPU in float32, seeded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt_small import GPT, GPTConfig
from gpt_small.config import PRESETS

ENCODINGS = ["learned", "sinusoidal", "rope"]




def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", **overrides)).eval()


def tokens(B: int, T: int, vocab_size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("enc", ENCODINGS)
@pytest.mark.parametrize("name", list(PRESETS))
def test_built_model_matches_closed_form_count(name, enc):
    cfg = GPTConfig.from_preset(name, pos_encoding=enc)
    with torch.device("meta"):  # shapes only: the 150M presets build in milliseconds
        model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.num_params(non_embedding=True) == cfg.num_params(non_embedding=True)


@pytest.mark.parametrize("bias, tie, qk_norm", [(True, True, False), (False, False, True), (True, False, True)])
@pytest.mark.parametrize("enc", ENCODINGS)
def test_built_tiny_model_counts(enc, bias, tie, qk_norm):
    cfg = GPTConfig.from_preset("tiny", pos_encoding=enc, bias=bias, tie_embeddings=tie, qk_norm=qk_norm)
    model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.num_params(non_embedding=True) == cfg.num_params(non_embedding=True)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie


@pytest.mark.parametrize("ngram", [2, 4])
def test_ngram_model_counts_and_starts_as_the_plain_model(ngram):
    cfg = GPTConfig.from_preset("tiny", ngram=ngram, ngram_buckets=1000)
    plain = tiny_model()
    model = tiny_model(ngram=ngram, ngram_buckets=1000)
    assert model.num_params() == cfg.num_params() == plain.num_params() + (ngram - 1) * 1000 * 32
    assert model.num_params(non_embedding=True) == plain.num_params(non_embedding=True)
    assert cfg.flops_per_token() == plain.config.flops_per_token()  # lookups, not matmuls
    assert all(t.weight.abs().max() == 0 for t in model.transformer.ngram.tables)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.startswith("transformer.ngram.") for k in missing) and not unexpected
    idx = tokens(2, 12)
    with torch.no_grad():  # zero tables: the plain model's logits
        torch.testing.assert_close(model(idx), plain(idx))


def test_ngram_rows_are_the_hash_of_the_last_n_tokens():
    from gpt_small.model import NgramEmbeddings

    V, buckets = 10, 121  # 121 = (V + 1)^2: one row per bigram, pad included
    emb = NgramEmbeddings(V, 3, buckets, 4)
    with torch.no_grad():
        for table in emb.tables:
            table.weight.copy_(torch.arange(buckets, dtype=torch.float32)[:, None].expand(buckets, 4))
    idx = torch.tensor([[3, 7, 2, 9]])
    before = torch.full((1, 2), V)  # the window starts here
    out = emb(idx, before)[0, :, 0]
    seq = [V, V, 3, 7, 2, 9]
    for i in range(4):
        t = i + 2
        bigram = seq[t] + seq[t - 1] * (V + 1)
        trigram = (bigram + seq[t - 2] * (V + 1) ** 2) % buckets
        assert out[i].item() == bigram + trigram
    # GPT-2's vocabulary, 8-grams: (V + 1)^7 overflows int64, the hash taken mod buckets does not
    big = NgramEmbeddings(50257, 8, 1_000_003, 1)
    for table in big.tables:
        table.weight.data = torch.arange(1_000_003, dtype=torch.float32)[:, None]
    ids = torch.tensor([[50256, 50255, 17, 0, 50000, 3, 9, 42, 50256]])
    got = big(ids, torch.full((1, 7), 50257))[0, -1, 0].item()
    seq = [50257] * 7 + ids[0].tolist()
    expected = sum(sum(seq[-1 - j] * 50258**j for j in range(n)) % 1_000_003 for n in range(2, 9))
    assert got == expected  # float32 holds these sums exactly (< 2^24)
    # bigrams of a vocabulary up to sqrt(buckets) - 1 never share a row
    a, b = torch.meshgrid(torch.arange(V + 1), torch.arange(V), indexing="ij")
    rows = b.flatten() + a.flatten() * (V + 1)
    assert rows.unique().numel() == (V + 1) * V and rows.max() < buckets


@pytest.mark.parametrize("bad", [0, 9, "two"])
def test_ngram_out_of_range_is_a_config_error(bad):
    from gpt_small.errors import ConfigError

    with pytest.raises(ConfigError, match="ngram must be"):
        GPTConfig.from_preset("tiny", ngram=bad)


def test_gpt2_124m_built_for_real():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-124m"))
    assert model.num_params() == 124_439_808
    # GPT-2 initialisation: N(0, 0.02), residual projections shrunk by 1/sqrt(2 * n_layer), wpe N(0, 0.01)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / 24**0.5, rel=0.02)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.equal(model.transformer.h[0].ln_1.weight, torch.ones(768))


# ---------------------------------------------------------------- Hugging Face reference

def test_logits_equal_huggingface_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64, activation="gelu",
                    pos_encoding="learned", bias=True, tie_embeddings=True)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    with torch.no_grad():  # non-zero biases and norms, so a skipped copy shows up
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf_cfg = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",  # the plain softmax(QK^T)V reference
    )
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    assert hf.config._attn_implementation == "eager"
    assert hf.num_parameters() == ours.num_params() == cfg.num_params()

    idx = tokens(3, 32, vocab_size=97)
    with torch.no_grad():
        expected_before = hf(idx).logits
    assert not torch.allclose(ours(idx), expected_before, atol=1e-3)  # a no-op copy would fail below

    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours_sd = ours.state_dict()
    hf_sd = hf.state_dict()
    assert set(hf_sd) == set(ours_sd)  # same names, one to one
    with torch.no_grad():
        for name, t in hf_sd.items():
            src = ours_sd[name]
            t.copy_(src.t() if name.endswith(conv1d) else src)  # HF's Conv1D stores (in, out)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()

    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- causality

@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("enc", ENCODINGS)
def test_future_tokens_do_not_change_past_logits(enc, qk_norm):
    model = tiny_model(pos_encoding=enc, qk_norm=qk_norm)
    idx = tokens(2, 24)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 7, 23):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 64
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-3, t
            if t + 1 < idx.shape[1]:  # later positions attend to it (weakly, at initialisation)
                assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-5, t


# ---------------------------------------------------------------- forward contract

def test_targets_give_mean_cross_entropy():
    model = tiny_model(pos_encoding="rope")
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    with torch.no_grad():
        logits, loss = model(idx, targets)
        assert logits.shape == (2, 16, 64)
        assert torch.equal(logits, model(idx))
        torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1)))
        targets[:, :4] = -1  # ignored positions, as padding
        _, masked = model(idx, targets)
        torch.testing.assert_close(masked, F.cross_entropy(logits[:, 4:].reshape(-1, 64), targets[:, 4:].reshape(-1)))


def test_learned_positions_reject_long_sequences():
    model = tiny_model(pos_encoding="learned")
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, 33))
    model.setup_kv_cache(1, 64)
    assert model.kv_cache_capacity == 32  # a learned table cannot go further, so neither does the cache
    with pytest.raises(ValueError, match="32"):
        model(tokens(1, 1), input_pos=torch.tensor([32]))


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    idx = tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx))
        model.train()
        assert not torch.equal(model(idx), model(idx))


def test_keep_mask_rate_and_scale_are_exact_in_every_lane():
    """Each 64-bit draw feeds four 15-bit lanes; the top lane must not be biased by the sign bit."""
    from gpt_small.ops.cpu import keep_mask

    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([1000, 1024]), 0.2, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (1000, 1024)
    p_rounded = round(0.2 * 2**15) / 2**15
    assert scale == pytest.approx(1 / (1 - p_rounded), rel=1e-12)
    lanes = keep.view(-1, 4).double().mean(0)  # one mean per lane of the 64-bit word
    assert torch.all((lanes - (1 - p_rounded)).abs() < 0.004), lanes  # ~5 standard deviations
    torch.manual_seed(0)
    assert torch.equal(keep_mask(torch.Size([1000, 1024]), 0.2, torch.device("cpu"))[0], keep)
    assert keep_mask(torch.Size([3, 5]), 0.0, torch.device("cpu"))[0].all()  # odd sizes, nothing dropped
    assert not keep_mask(torch.Size([7]), 1.0, torch.device("cpu"))[0].any()


def test_cpu_dropout_keeps_the_expectation():
    from gpt_small.ops.cpu import dropout

    torch.manual_seed(1)
    x = torch.ones(2_000_000)
    y = dropout(x, 0.3, training=True)
    values = y.unique()
    assert len(values) == 2 and values[0] == 0.0
    assert values[1].item() == pytest.approx(1 / (1 - round(0.3 * 2**15) / 2**15), rel=1e-6)
    assert y.mean().item() == pytest.approx(1.0, abs=0.003)
    assert dropout(x, 0.3, training=False) is x


def test_spelled_out_attention_is_sdpa_math_with_our_mask():
    from gpt_small.ops.cpu import explicit_causal_attention as causal_attention, keep_mask

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g, requires_grad=True) for _ in range(3))
    # p = 0: exactly causal SDPA, values and gradients (training at T <= 128 takes this path)
    dy = torch.randn(2, 3, 10, 8, generator=g)
    ours = torch.autograd.grad(causal_attention(q, k, v), (q, k, v), dy)
    sdpa = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dy)
    torch.testing.assert_close(causal_attention(q, k, v, 0.0),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=0)
    for a, b in zip(ours, sdpa):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # p > 0: softmax(causal scores), times the mask a fresh seed gives, times v
    torch.manual_seed(5)
    got = causal_attention(q, k, v, 0.25)
    torch.manual_seed(5)
    keep, scale = keep_mask(torch.Size([6, 10, 10]), 0.25, torch.device("cpu"))
    scores = (q @ k.transpose(-2, -1)) / 8**0.5
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) * keep.view(2, 3, 10, 10) * scale) @ v
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    got.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_model_gives_the_same_loss_and_gradients_on_either_attention_path(monkeypatch):
    import gpt_small.ops.cpu as cpu_ops

    model = tiny_model(pos_encoding="rope", qk_norm=True)
    idx = tokens(2, 16)

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    spelled_out = loss_and_grads()  # 16 tokens: under the threshold
    monkeypatch.setattr(cpu_ops, "_EXPLICIT_ATTENTION_MAX_T", 0)
    flash = loss_and_grads()
    torch.testing.assert_close(spelled_out[0], flash[0], atol=1e-6, rtol=0)
    for a, b in zip(spelled_out[1], flash[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("qk_norm, ngram", [(False, 1), (True, 1), (False, 3)])
@pytest.mark.parametrize("enc", ENCODINGS)
def test_cached_decoding_equals_uncached(enc, qk_norm, ngram):
    model = tiny_model(pos_encoding=enc, qk_norm=qk_norm, ngram=ngram, ngram_buckets=500)
    with torch.no_grad():  # n-gram tables start at zero; give them weight so a wrong history shows
        for p in model.parameters():
            if p.dim() == 2 and p.abs().max() == 0:
                p.normal_(0.0, 0.5)
    idx = tokens(2, 20)
    with torch.no_grad():
        full = model(idx)
        model.setup_kv_cache(batch_size=4, max_seq_len=32)  # larger than needed: only [:B] is used
        for attempt in range(2):  # a second request reuses the cache written by the first
            parts = [model(idx[:, :10], input_pos=torch.arange(10)),  # prefill
                     model(idx[:, 10:15], input_pos=torch.arange(10, 15))]  # a chunk after a prefix
            parts += [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(15, 20)]
            torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    model.clear_kv_cache()
    assert model.kv_cache_capacity == 0 and model.kv_cache is None
    with pytest.raises(RuntimeError, match="setup_kv_cache"):
        model(idx, input_pos=torch.arange(20))


@pytest.mark.parametrize("enc", ["sinusoidal", "rope"])
def test_fixed_encodings_decode_past_block_size(enc):
    # Nothing in these models depends on block_size, so the same weights with a longer block_size
    # give the reference for positions 32..39 that the tiny model's cache reaches by extension.
    model = tiny_model(pos_encoding=enc)
    longer = GPT(GPTConfig.from_preset("tiny", pos_encoding=enc, block_size=64)).eval()
    longer.load_state_dict(model.state_dict())
    idx = tokens(1, 40)
    with torch.no_grad():
        expected = longer(idx)
        model.setup_kv_cache(1, 48)
        parts = [model(idx[:, :30], input_pos=torch.arange(30))]
        parts += [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(30, 40)]
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- safetensors

@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_round_trip_gives_the_same_model(tmp_path, tie):
    """Our save_checkpoint / load_checkpoint (safetensors + JSON): the same logits, a tied head
    stored once and tied again on load."""
    from safetensors.torch import load_file

    from gpt_small.checkpoint import load_checkpoint, load_weights, save_checkpoint
    from gpt_small.tokenizer import CharTokenizer

    model = tiny_model(seed=0, pos_encoding="rope", qk_norm=True, tie_embeddings=tie)
    tok = CharTokenizer([chr(ord("a") + i) for i in range(63)])  # 63 characters + <unk> = vocab 64
    ckpt = save_checkpoint(tmp_path / "run", step=3, model=model, tokenizer=tok,
                           config={"model": model.config.to_dict()})
    assert ("lm_head.weight" in load_file(str(ckpt / "model.safetensors"))) == (not tie)
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.meta["step"] == 3 and loaded.model.config == model.config
    assert (loaded.model.lm_head.weight is loaded.model.transformer.wte.weight) == tie
    idx = tokens(2, 32)
    other = tiny_model(seed=1, pos_encoding="rope", qk_norm=True, tie_embeddings=tie)
    with torch.no_grad():
        assert not torch.equal(other(idx), model(idx))
        assert torch.equal(loaded.model.eval()(idx), model(idx))
        load_weights(other, ckpt)  # in place, into a model built elsewhere
        assert torch.equal(other(idx), model(idx))


# ---------------------------------------------------------------- end to end at toy scale

@pytest.mark.parametrize("enc", ENCODINGS)
def test_tiny_model_overfits_one_batch(enc):
    model = tiny_model(pos_encoding=enc).train()
    batch = tokens(4, 33)
    x, y = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        _, loss = model(x, y)
        if loss.item() < 0.1:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_inference_linear_equals_f_linear():
    """Large Linears run oneDNN without autograd on the CPU: the same function as F.linear."""
    from gpt_small.model import Linear
    from gpt_small.ops.cpu import _ONEDNN_MIN_WEIGHTS

    torch.manual_seed(0)
    layer = Linear(512, _ONEDNN_MIN_WEIGHTS // 512, bias=True)
    x = torch.randn(3, 5, 512)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(layer(x[:, -1:]), F.linear(x[:, -1:], layer.weight, layer.bias),
                                   atol=1e-4, rtol=1e-5)  # a non-contiguous slice, as last_only gives
    y = layer(x)  # with autograd: F.linear itself
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert layer.weight.grad is not None


def test_relu_squared_matches_autograd():
    from gpt_small.ops.cpu import ReluSquared

    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReluSquared.apply, (x,))
    y = torch.randn(64, 32)
    torch.testing.assert_close(ReluSquared.apply(y), F.relu(y).square(), atol=0, rtol=0)
