"""The C decoding step where a trained model differs from a fresh one: a residual stream whose
mean is far from zero, so that LayerNorm's centring counts (a fresh model's activations have a
mean near 0, where a LayerNorm that forgets to subtract the mean gives nearly the same output)."""

from __future__ import annotations

import pytest
import torch

from gpt_small.ops import decoder, kernels
from test_decoder import CONFIGS, _decode, _model

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=kernels.describe())


@needs_kernel
@pytest.mark.parametrize("name", CONFIGS)
def test_fused_step_equals_the_blocks_with_an_offset_residual_stream(name):
    model = _model(name, "float32")
    with torch.no_grad():
        model.transformer.wte.weight.add_(3.0)  # every token's embedding shifted: mean 3 per channel
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 97, (3, 6), generator=g)
    fused = _decode(model, idx, [6, 6, 6], 6, fused=True)
    assert decoder._prepared[model][1] is not None, "the fused step did not run"
    reference = _decode(model, idx, [6, 6, 6], 6, fused=False)
    # fp32 rounding grows with the offset (differences near 1e-4 here); a LayerNorm that does not
    # centre is off by far more
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-3)
