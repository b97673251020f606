"""The remote code of an export (gpt_small/interop/remote), imported here as our own modules.

`gpt-small export` copies modeling_gpt_small.py and configuration_gpt_small.py into the folder of
a model that no standard transformers architecture expresses; transformers loads them from there
with `trust_remote_code=True` (tests/test_interop_export.py does, on exported folders). Here the
same files are imported in-process, as package modules, and the transformers model is loaded by
`from_pretrained` from the config.json and weights that export writes (hf_export's
gpt_small_config and gpt_small_state) for tiny hand-made models. Our model is the reference: the
logits of every position kind, activation, bias, QK-norm, head and n-gram setting; greedy
generation past block_size against `gpt_small.generate` with the per-token slide; the loss of
transformers' `labels`; the refusal of padding; the config's fields and defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from gpt_small.config import GPTConfig  # noqa: E402
from gpt_small.generate import generate_tokens  # noqa: E402
from gpt_small.interop.hf_export import gpt_small_config, gpt_small_state  # noqa: E402
from gpt_small.interop.remote.configuration_gpt_small import GPTSmallConfig  # noqa: E402
from gpt_small.interop.remote.modeling_gpt_small import GPTSmallForCausalLM, sinusoidal_table  # noqa: E402
from gpt_small.model import GPT  # noqa: E402
from gpt_small.positional import sinusoidal_table as our_sinusoidal_table  # noqa: E402

V = 23
SMALL = dict(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32)
TIGHT = dict(rtol=1e-5, atol=1e-5)  # fp32, the same function: rounding only
PADDING_REFUSED = "gpt-small's exported model does not support padding: pass one prompt, or prompts of one length"


def ours(seed: int = 0, **overrides) -> GPT:
    """Our model with every parameter moved off its initial value (LayerNorms, biases and n-gram
    tables start as ones and zeros, which would hide a lost or swapped one)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def write(model: GPT, folder: Path, eos_id: int | None = None) -> str:
    """`model` as `gpt-small export` writes a remote-code folder: config.json, model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(gpt_small_config(model.config, eos_id)))
    save_file(gpt_small_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def exported(model: GPT, folder: Path, eos_id: int | None = None, **kw) -> GPTSmallForCausalLM:
    """`model` written as export writes it, loaded by transformers' from_pretrained into the class
    of modeling_gpt_small.py."""
    return GPTSmallForCausalLM.from_pretrained(write(model, folder, eos_id), **kw).eval()


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# every position kind, activation, bias, QK-norm, head and n-gram setting, each in more than one company
SHAPES = [
    dict(),  # GPTConfig's defaults: learned positions, ReLU, biases, tied head, no QK-norm, no n-grams
    dict(pos_encoding="sinusoidal", activation="gelu", bias=False, qk_norm=True, tie_embeddings=False, ngram=3),
    dict(pos_encoding="rope", activation="relu2", qk_norm=True, ngram=2, ngram_buckets=50),
    dict(pos_encoding="rope", activation="gelu", bias=False, tie_embeddings=False, ngram=4, ngram_buckets=97,
         rope_theta=500.0, n_head=4),
    dict(pos_encoding="learned", activation="relu2", bias=False, qk_norm=True, tie_embeddings=False, mlp_ratio=2),
    dict(pos_encoding="sinusoidal", ngram=2, ngram_buckets=50),
    dict(pos_encoding="learned", activation="gelu", qk_norm=True, ngram=8, ngram_buckets=1000),
    dict(pos_encoding="rope", n_head=1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_logits_equal_ours(tmp_path, shape):
    model = ours(**shape)
    theirs = exported(model, tmp_path)
    x = ids(3, 16)
    with torch.no_grad():
        for T in (16, 5, 1):  # the whole block, a prefix (positions 0..T-1 of each table), one token
            assert_close(theirs(x[:, :T]).logits, model(x[:, :T]), **TIGHT)


@pytest.mark.parametrize("shape", [dict(qk_norm=True, bias=False), dict(qk_norm=True, tie_embeddings=False),
                                   dict(pos_encoding="rope", ngram=3, bias=False, tie_embeddings=False),
                                   dict(pos_encoding="sinusoidal", ngram=2)],
                         ids=["qk_norm-no-bias", "qk_norm-untied", "rope-ngram3-no-bias-untied", "sinusoidal-ngram2"])
def test_every_weight_of_the_model_is_one_that_export_writes(tmp_path, shape):
    """No weight missing (it would be left at an initial value), none left over, none of another
    shape: the model's parameters are exactly the exported tensors (a tied head once)."""
    model = ours(**shape)
    theirs, info = GPTSmallForCausalLM.from_pretrained(write(model, tmp_path), output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    written = gpt_small_state(model)
    assert {k: v.shape for k, v in theirs.named_parameters()} == {k: v.shape for k, v in written.items()}


@pytest.mark.parametrize("shape", [dict(pos_encoding="sinusoidal", ngram=3), dict(pos_encoding="rope", qk_norm=True),
                                   dict(pos_encoding="learned", ngram=2)], ids=["sinusoidal-ngram3", "rope", "learned"])
def test_a_forward_follows_its_weights_device(tmp_path, shape):
    """Every tensor a forward makes (position tables, rotations, n-gram padding) is made on the
    device of the input: torch's meta device (shapes without data) stands in for a GPU here."""
    theirs = exported(ours(**shape), tmp_path).to("meta")
    logits = theirs(ids(2, 16).to("meta")).logits
    assert (logits.device.type, logits.shape) == ("meta", (2, 16, V))


@pytest.mark.parametrize("shape", [dict(pos_encoding="sinusoidal", ngram=3), dict(pos_encoding="rope", qk_norm=True)],
                         ids=["sinusoidal", "rope"])
def test_a_forward_does_not_depend_on_torchs_default_dtype(tmp_path, shape):
    """The position tables are computed in float32 whatever torch.set_default_dtype says: the
    same logits, bit for bit, and the same table as ours."""
    theirs = exported(ours(**shape), tmp_path)
    x = ids(2, 16)
    with torch.no_grad():
        expected = theirs(x).logits
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            got = theirs(x).logits
            table = sinusoidal_table(16, 32)
        finally:
            torch.set_default_dtype(before)
    assert_close(got, expected, rtol=0, atol=0)
    assert_close(table, our_sinusoidal_table(16, 32), rtol=0, atol=0)


def test_the_ngram_hash_of_int32_ids_is_that_of_int64_ids(tmp_path):
    """A vocabulary times bucket count past 2**31: the hash of (V-1, V-1) reaches past int32, and
    int32 ids (numpy's integers on some platforms) still give the logits of int64 ids."""
    big = 46341  # (big - 1) * (big + 1) > 2**31 - 1
    model = ours(vocab_size=big, n_embd=8, n_head=2, n_layer=1, ngram=3, ngram_buckets=46400, qk_norm=True)
    theirs = exported(model, tmp_path)
    x = torch.tensor([[big - 1, big - 1, 5, big - 2, big - 1]])
    with torch.no_grad():
        expected = model(x)
        assert_close(theirs(x).logits, expected, **TIGHT)
        assert_close(theirs(x.int()).logits, expected, **TIGHT)
        assert_close(model(x.int()), expected, **TIGHT)  # ours too


def test_a_tied_head_is_the_token_embedding_and_an_untied_one_its_own(tmp_path):
    tied = exported(ours(qk_norm=True), tmp_path / "tied")
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    model = ours(qk_norm=True, tie_embeddings=False)
    untied = exported(model, tmp_path / "untied")
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    assert torch.equal(untied.get_output_embeddings().weight, model.lm_head.weight)
    assert torch.equal(untied.get_input_embeddings().weight, model.transformer.wte.weight)


def test_the_embeddings_can_be_replaced_and_resized(tmp_path):
    """transformers' resize_token_embeddings (adding tokens before a fine-tune) goes through the
    get/set methods: both tables grow, the old rows are kept, a tied head stays tied."""
    model = ours(qk_norm=True)
    theirs = exported(model, tmp_path)
    theirs.resize_token_embeddings(V + 3)
    assert theirs.get_input_embeddings().weight.shape == theirs.get_output_embeddings().weight.shape == (V + 3, 32)
    assert theirs.lm_head.weight is theirs.transformer.wte.weight
    assert torch.equal(theirs.transformer.wte.weight[:V], model.transformer.wte.weight)
    assert theirs(ids(1, 4)).logits.shape == (1, 4, V + 3)
    wte, head = torch.nn.Embedding(V, 32), torch.nn.Linear(32, V, bias=False)
    theirs.set_input_embeddings(wte)
    theirs.set_output_embeddings(head)
    assert theirs.get_input_embeddings() is wte and theirs.transformer.wte is wte
    assert theirs.get_output_embeddings() is head and theirs.lm_head is head


def test_the_sinusoidal_table_is_ours():
    for n_pos, dim in ((16, 32), (7, 6), (1, 2)):
        assert_close(sinusoidal_table(n_pos, dim), our_sinusoidal_table(n_pos, dim), rtol=0, atol=0)
    assert_close(sinusoidal_table(9, 8, base=100.0), our_sinusoidal_table(9, 8, base=100.0), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [dict(pos_encoding="learned", qk_norm=True),
                                   dict(pos_encoding="rope", ngram=3, ngram_buckets=50),
                                   dict(pos_encoding="sinusoidal", ngram=2, activation="gelu")],
                         ids=["learned", "rope-ngram3", "sinusoidal-ngram2"])
@pytest.mark.parametrize("T0", [5, 20])  # a prompt inside the block and one longer than it
def test_greedy_generation_past_block_size_equals_gpt_small_generate(tmp_path, shape, T0):
    """Each step sees the last block_size tokens at positions 0..block_size-1 (n-grams reaching
    before them see the padding token), as `gpt-small generate --window-keep slide`."""
    model = ours(**shape)
    theirs = exported(model, tmp_path)
    prompt, n = ids(2, T0, seed=7), 3 * 16
    expected = torch.stack(list(generate_tokens(model, prompt, max_new_tokens=n, temperature=0.0, keep="slide")), 1)
    out = theirs.generate(prompt, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, :T0], prompt)
    assert torch.equal(out.sequences[:, T0:], expected)
    assert len(out.logits) == n
    with torch.no_grad():
        for i, logits in enumerate(out.logits):
            window = out.sequences[:, :T0 + i][:, -16:]
            assert_close(logits, model(window)[:, -1], **TIGHT)


def test_generation_with_use_cache_asked_gives_the_same_tokens(tmp_path):
    """The model has no KV cache: asking generate for one changes nothing (each step recomputes the window)."""
    theirs = exported(ours(pos_encoding="rope", qk_norm=True), tmp_path)
    x = ids(2, 5)
    without = theirs.generate(x, max_new_tokens=24, do_sample=False, use_cache=False)
    assert torch.equal(theirs.generate(x, max_new_tokens=24, do_sample=False, use_cache=True), without)


def test_generation_stops_at_the_configured_end_of_text(tmp_path):
    model = ours(qk_norm=True)
    prompt = ids(1, 4, seed=3)
    first = next(generate_tokens(model, prompt, max_new_tokens=1, temperature=0.0)).item()
    theirs = exported(model, tmp_path, eos_id=first)  # the first greedy token is the end of text
    assert theirs.config.eos_token_id == first
    out = theirs.generate(prompt, max_new_tokens=10, do_sample=False)
    assert out[0].tolist() == prompt[0].tolist() + [first]


def test_padding_is_refused_and_a_mask_of_ones_is_no_mask(tmp_path):
    theirs = exported(ours(ngram=2), tmp_path)
    x = ids(2, 6)
    with torch.no_grad():
        plain = theirs(x).logits
        assert_close(theirs(x, attention_mask=torch.ones_like(x)).logits, plain, rtol=0, atol=0)
        for zero_at in ((0, 0), (1, 5), (1, 2)):  # left padding, right padding, a hole
            mask = torch.ones_like(x)
            mask[zero_at] = 0
            with pytest.raises(ValueError) as e:
                theirs(x, attention_mask=mask)
            assert str(e.value) == PADDING_REFUSED
        with pytest.raises(ValueError) as e:  # what a padded batch of prompts reaches through generate
            theirs.generate(x, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]), max_new_tokens=2,
                            do_sample=False)
        assert str(e.value) == PADDING_REFUSED
        out = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
        assert torch.equal(out, theirs.generate(x, max_new_tokens=3, do_sample=False))


def test_the_mask_is_read_over_the_window_only(tmp_path):
    """Left padding that lies before the last block_size tokens is never seen: a padded row then
    generates what it would alone; one padded position inside the window is refused."""
    model = ours(ngram=2)
    theirs = exported(model, tmp_path)
    long, short = ids(1, 20, seed=4), ids(1, 16, seed=5)
    batch = torch.cat((long, torch.cat((torch.zeros(1, 4, dtype=torch.long), short), 1)))
    mask = torch.ones_like(batch)
    mask[1, :4] = 0  # the window is positions 4..19: all ones
    out = theirs.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, prompt in zip(out, (long, short)):
        alone = torch.stack(list(generate_tokens(model, prompt, max_new_tokens=8, temperature=0.0, keep="slide")), 1)
        assert torch.equal(row[20:], alone[0])
    mask[1, 4] = 0  # the first position of the window is padding
    with pytest.raises(ValueError) as e:
        theirs.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert str(e.value) == PADDING_REFUSED


def test_labels_give_our_loss_shifted_with_minus_100_ignored(tmp_path):
    """transformers' convention: labels are the inputs themselves; the model shifts them, and
    ignores -100. Our loss over the same next tokens is the reference (ours ignores -1)."""
    model = ours(pos_encoding="rope", qk_norm=True, ngram=2, ngram_buckets=50)
    theirs = exported(model, tmp_path)
    x = ids(2, 12)
    labels = x.clone()
    labels[0, 3] = labels[1, 11] = -100
    targets = labels[:, 1:].clone()
    targets[targets == -100] = -1
    with torch.no_grad():
        out = theirs(x, labels=labels)
        _, expected = model(x[:, :-1], targets=targets)
        assert_close(out.loss, expected, **TIGHT)
        assert_close(out.logits, model(x), **TIGHT)
        _, unmasked = model(x[:, :-1], targets=x[:, 1:])
        assert not torch.allclose(out.loss, unmasked)
        assert theirs(x).loss is None


@pytest.mark.parametrize("shape", [dict(pos_encoding="rope", qk_norm=True),
                                   dict(pos_encoding="sinusoidal", ngram=3, bias=False)], ids=["rope", "sinusoidal"])
def test_a_bfloat16_load_computes_in_bfloat16(tmp_path, shape):
    """An export written with --dtype bfloat16 loads in bfloat16: every step stays in that dtype
    (rotations and the sinusoidal table included), close to the float32 logits."""
    model = ours(**shape)
    theirs = exported(model, tmp_path, dtype=torch.bfloat16)
    x = ids(2, 16)
    with torch.no_grad():
        logits = theirs(x).logits
        assert logits.dtype == torch.bfloat16
        assert_close(logits.float(), model(x), rtol=0.05, atol=0.1)
        out = theirs.generate(x[:, :4], max_new_tokens=20, do_sample=False)
        assert out.shape == (2, 24)


# ---------------------------------------------------------------- the config

def test_the_configs_defaults_are_gpt_smalls():
    """The fields are GPTConfig's, same names and defaults (dropout aside: export writes none)."""
    c = GPTSmallConfig()
    expected = {k: v for k, v in GPTConfig().to_dict().items() if k != "dropout"}
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.model_type == "gpt_small"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (384, 6, 6)
    assert c.tie_word_embeddings is True
    # no maximum length: generation slides its window past block_size
    assert not hasattr(c, "max_position_embeddings")


def test_the_config_holds_each_field_given_and_round_trips(tmp_path):
    cfg = GPTConfig(vocab_size=50, block_size=8, n_layer=3, n_head=4, n_embd=16, bias=False, activation="relu2",
                    mlp_ratio=3, pos_encoding="rope", rope_theta=123.0, tie_embeddings=False, qk_norm=True,
                    ngram=5, ngram_buckets=77)
    written = gpt_small_config(cfg, 7)  # as export writes config.json
    c = GPTSmallConfig.from_dict(written)
    fields = {k: v for k, v in cfg.to_dict().items() if k != "dropout"}
    assert {k: getattr(c, k) for k in fields} == fields
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (16, 3, 4)
    assert c.tie_word_embeddings is False
    assert (c.bos_token_id, c.eos_token_id) == (7, 7)
    assert c.auto_map == written["auto_map"]
    assert c.architectures == ["GPTSmallForCausalLM"]
    d = c.to_dict()
    # all that export writes (use_cache aside: transformers 5 keeps it in the generation config only)
    assert {k: d.get(k, "absent") for k in written if k != "use_cache"} == \
        {k: v for k, v in written.items() if k != "use_cache"}
    assert GPTSmallConfig.from_dict(d).to_dict() == d
    c.save_pretrained(str(tmp_path))
    again = GPTSmallConfig.from_pretrained(str(tmp_path))
    assert again.to_dict() == {**d, "transformers_version": again.to_dict()["transformers_version"]}
    for tie in (True, False):  # transformers' own name follows ours, given alone
        c = GPTSmallConfig(tie_embeddings=tie, n_embd=64, n_layer=2, n_head=8)
        assert (c.tie_word_embeddings, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (tie, 64, 2, 8)
