"""Position encodings against their formulas: RoPE against RoFormer's complex-number form (half-split
pairing, fp32 angles), the sinusoidal table against Vaswani et al. written with `math`, and what each
leaves in a model's parameters and checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from gpt_small import GPT, GPTConfig
from gpt_small.positional import (
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    apply_rotary,
    sinusoidal_table,
)

HS = 16  # head size used throughout


def rope_reference(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoFormer (Su et al. 2021, eq. 34) in float64 complex numbers, half-split pairing:
    z_j = x_j + i x_{j+d/2} turns by m * theta^(-2j/d); the real and imaginary parts are the two halves."""
    d = x.shape[-1]
    x = x.double()
    z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    j = torch.arange(d // 2, dtype=torch.float64)
    angle = pos.double()[:, None] * theta ** (-2 * j / d)  # (T, d/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def angle_tol(max_pos: int) -> float:
    # fp32 angles are off by about pos * 2^-24 radians, which no fp32 implementation can avoid;
    # with |x| < ~5 that is the slack beyond 1e-6 allowed at large positions.
    return 1e-6 + 5 * max_pos * 2.0**-24


# ---------------------------------------------------------------- RoPE

@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_roformer_formula(theta):
    torch.manual_seed(0)
    rope = RotaryEmbedding(HS, block_size=16, theta=theta)
    q, k = torch.randn(2, 3, 16, HS), torch.randn(2, 3, 16, HS)  # (B, nh, T, hs)
    pos = torch.arange(16)
    rq, rk = rope(q, k, pos)
    assert rq.dtype == rk.dtype == torch.float32
    torch.testing.assert_close(rq.double(), rope_reference(q, pos, theta), atol=1e-6, rtol=0)
    torch.testing.assert_close(rk.double(), rope_reference(k, pos, theta), atol=1e-6, rtol=0)


def test_rope_pairs_dimension_j_with_j_plus_half():
    # Unit vector e_0 at position m goes to cos(m) e_0 + sin(m) e_{d/2} (pair 0 turns at rate 1).
    # The interleaved convention would put sin(m) in e_1 instead.
    rope = RotaryEmbedding(4, block_size=8)
    x = torch.zeros(1, 1, 8, 4)
    x[..., 0] = 1.0
    out, _ = rope(x, x, torch.arange(8))
    for m in range(8):
        assert out[0, 0, m].tolist() == pytest.approx([math.cos(m), 0.0, math.sin(m), 0.0], abs=1e-6)


def test_rope_position_zero_is_identity_and_norm_is_preserved():
    torch.manual_seed(1)
    rope = RotaryEmbedding(HS, block_size=64)
    x = torch.randn(2, 4, 64, HS)
    out, _ = rope(x, x, torch.arange(64))
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-6)


def test_rope_dot_product_depends_only_on_offset():
    torch.manual_seed(2)
    rope = RotaryEmbedding(HS, block_size=8)
    q, k = torch.randn(1, 1, 1, HS), torch.randn(1, 1, 1, HS)

    def score(m: int, n: int) -> float:
        rq, _ = rope(q, q, torch.tensor([m]))
        _, rk = rope(k, k, torch.tensor([n]))
        return float((rq * rk).sum())

    for offset in (0, 3, -5):
        scores = [score(n + offset, n) for n in (5, 17, 40, 123)]
        assert scores == pytest.approx([scores[0]] * len(scores), abs=1e-4), offset
    assert abs(score(10, 7) - score(10, 2)) > 1e-3  # and the offset does matter


def test_rope_extends_past_cached_length():
    torch.manual_seed(3)
    rope = RotaryEmbedding(HS, block_size=8)
    q, k = torch.randn(1, 2, 15, HS), torch.randn(1, 2, 15, HS)
    pos = torch.arange(5, 20)
    rq, rk = rope(q, k, pos)
    assert rope.cos.shape[0] >= 20 and rope.sin.shape == rope.cos.shape
    assert rope.cos.dtype == torch.float32
    torch.testing.assert_close(rq.double(), rope_reference(q, pos), atol=angle_tol(20), rtol=0)
    torch.testing.assert_close(rk.double(), rope_reference(k, pos), atol=angle_tol(20), rtol=0)


def test_rope_angles_are_fp32_for_bf16_inputs():
    torch.manual_seed(4)
    rope = RotaryEmbedding(HS, block_size=8)
    x = torch.randn(1, 2, 3, HS).to(torch.bfloat16)
    pos = torch.tensor([1001, 1003, 2047])  # not representable in bf16 (spacing 4 and 8 up there)
    out, _ = rope(x, x, pos)
    assert out.dtype == torch.bfloat16
    expected = rope_reference(x, pos).to(torch.bfloat16)  # exact angles, one rounding at the end
    torch.testing.assert_close(out, expected)  # bf16 tolerances
    # the tolerance does catch bf16 angles: positions rounded to bf16 give another rotation
    bf16_angles = rope_reference(x, pos.to(torch.bfloat16).float()).to(torch.bfloat16)
    assert (bf16_angles.float() - expected.float()).abs().max() > 0.1


def test_apply_rotary_keeps_dtype():
    """bf16 in, bf16 out (forward and gradient), the rotation computed in fp32 and rounded once."""
    torch.manual_seed(6)
    x = torch.randn(2, 3, 4, HS).to(torch.bfloat16).requires_grad_()
    angles = torch.rand(4, HS // 2) * 6.0
    cos, sin = angles.cos(), angles.sin()
    out = apply_rotary(x, cos, sin)
    assert out.dtype == torch.bfloat16
    x1, x2 = x.detach().float().chunk(2, dim=-1)
    expected = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(torch.bfloat16)
    torch.testing.assert_close(out, expected)  # bf16 tolerances: one rounding at the end
    assert not torch.equal(out.float(), x.detach().float())  # a real rotation, not the identity
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_apply_rotary_gradient_is_autograd_of_the_formula():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 7, HS, requires_grad=True)
    angles = torch.rand(7, HS // 2) * 6
    cos, sin = angles.cos(), angles.sin()
    grad = torch.randn(2, 3, 7, HS)
    (ours,) = torch.autograd.grad(apply_rotary(x, cos, sin), x, grad)
    x1, x2 = x.chunk(2, dim=-1)
    formula = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    torch.testing.assert_close(apply_rotary(x, cos, sin), formula)
    (expected,) = torch.autograd.grad(formula, x, grad)
    torch.testing.assert_close(ours, expected)
    # also through a non-contiguous view, as q and k are (a transpose of the fused qkv output)
    xt = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    (through_view,) = torch.autograd.grad(apply_rotary(xt, cos, sin), xt, grad)
    torch.testing.assert_close(through_view, expected)


# ---------------------------------------------------------------- sinusoidal

@pytest.mark.parametrize("pos, i", [(0, 0), (1, 0), (1, 3), (7, 1), (20, 5), (49, 7), (33, 2)])
def test_sinusoidal_table_matches_formula(pos, i):
    d = 16
    table = sinusoidal_table(50, d)
    angle = pos / 10000 ** (2 * i / d)
    assert table.dtype == torch.float32 and table.shape == (50, d)
    assert float(table[pos, 2 * i]) == pytest.approx(math.sin(angle), abs=1e-5)
    assert float(table[pos, 2 * i + 1]) == pytest.approx(math.cos(angle), abs=1e-5)


def test_sinusoidal_extends_past_block_size():
    module = SinusoidalPositions(block_size=8, n_embd=16)
    out = module(torch.arange(20))
    assert module.table.shape[0] >= 20
    torch.testing.assert_close(out, sinusoidal_table(20, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(module(torch.tensor([3])), sinusoidal_table(8, 16)[3:4], atol=0, rtol=0)


def test_learned_positions_look_up_rows():
    module = LearnedPositions(block_size=8, n_embd=4)
    torch.nn.init.normal_(module.weight)
    assert torch.equal(module(torch.tensor([2, 5])), module.weight[[2, 5]])


# ---------------------------------------------------------------- what a model carries

@pytest.mark.parametrize("enc", ["sinusoidal", "rope"])
def test_fixed_encodings_have_no_parameters_or_checkpoint_entries(enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", pos_encoding=enc))
    names = [n for n, _ in model.named_parameters()]
    assert not any("wpe" in n or "rope" in n for n in names)
    assert not any(k.startswith(("transformer.wpe", "rope")) or k.endswith(("table", ".cos", ".sin", "inv_freq"))
                   for k in model.state_dict())


def test_learned_encoding_is_a_parameter():
    model = GPT(GPTConfig.from_preset("tiny", pos_encoding="learned"))
    params = dict(model.named_parameters())
    assert params["transformer.wpe.weight"].shape == (32, 32)
    assert "transformer.wpe.weight" in model.state_dict()
