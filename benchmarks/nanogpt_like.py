"""The baseline the benchmarks time us against: nanoGPT's model and training step, rewritten plainly.

This is not nanoGPT's file; it is the same computation written from its description (karpathy/
nanoGPT, model.py and train.py at the commit named in shared/anchors.md) so that it can run in the
same process tree as our trainer, on the same machine, minutes apart:
- pre-norm blocks; LayerNorm without bias (train.py's default bias=False); exact (erf) GELU;
- attention through F.scaled_dot_product_attention(is_causal=True, dropout_p=dropout in training),
  separate attention-output and residual dropout, embedding dropout;
- learned positions, tied token embedding and head, GPT-2 init with scaled c_proj;
- AdamW with two groups (decay on >= 2-D tensors), fused only on CUDA, as nanoGPT's
  configure_optimizers does, so foreach on the CPU; gradient clipping at 1.0;
- get_batch: random windows from a uint16 memmap, torch.stack of torch.from_numpy(int64);
- no torch.compile (its train.py compiles by default, but the anchor figures were measured without),
  no allocator or thread changes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.dropout = n_head, dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = Attention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=False), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=False), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPTLike(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("2.weight") or "c_proj" in name else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


class BaselineTrainer:
    """nanoGPT's iteration: forward, backward, clip, AdamW step, zero_grad, next batch."""

    def __init__(self, data: np.ndarray, *, vocab_size: int, block_size: int, n_layer: int, n_head: int,
                 n_embd: int, dropout: float, batch_size: int, lr: float = 1e-3, seed: int = 1337):
        torch.manual_seed(seed)
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.model = NanoGPTLike(vocab_size, block_size, n_layer, n_head, n_embd, dropout)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
        self.x, self.y = self.get_batch()

    def get_batch(self):
        ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,))
        x = torch.stack([torch.from_numpy(self.data[i:i + self.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(self.data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in ix])
        return x, y

    def train_step(self) -> float:
        loss = self.model(self.x, self.y)
        self.x, self.y = self.get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()
