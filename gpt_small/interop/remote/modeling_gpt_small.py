"""A gpt-small GPT as a transformers model, for `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`.

Written by `gpt-small export` for the models that no standard transformers architecture
expresses (hashed n-gram input tables, QK-norm; the poem-cpu preset has both). Self-contained:
it imports torch and transformers only, never gpt_small, so the folder works where gpt-small is
not installed. The parameter names are gpt-small's, one to one.

The same function as gpt-small's model in fp32: learned, sinusoidal or rotary (half-split pairs,
as GPT-NeoX) positions, pre-norm blocks, ReLU / GELU (tanh form) / squared ReLU, optional biases,
optional per-head LayerNorm on queries and keys, hashed 2..n-gram embeddings added to the token
embeddings (positions before the window count as the padding token `vocab_size`).

Generation recomputes the whole window each step (no KV cache: the models are small). Past
`block_size` tokens it keeps the last `block_size`, at positions 0..block_size-1, as
`gpt-small generate` does, so greedy output matches it at any length. Padding (a batch of
prompts of different lengths) is not supported: the attention mask must be all ones over the
tokens the model sees (the last `block_size`), else forward and generate raise ValueError.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_gpt_small import GPTSmallConfig


def sinusoidal_table(n_pos, dim, base=10000.0):
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
    table = torch.empty(n_pos, dim, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


def rotate(x, cos, sin):
    """Half-split rotation: dimension j pairs with j + hs/2; (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head, self.head_size = config.n_head, C // config.n_head
        self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        if config.qk_norm:
            self.q_norm = nn.LayerNorm(self.head_size, bias=config.bias)
            self.k_norm = nn.LayerNorm(self.head_size, bias=config.bias)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rope):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.activation = config.activation

    def forward(self, x):
        h = self.c_fc(x)
        if self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "gelu":
            h = F.gelu(h, approximate="tanh")
        else:  # relu2
            h = torch.relu(h).square()
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope):
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class NgramEmbeddings(nn.Module):
    """n-gram t[i-n+1..i] -> row sum_j t[i-j] (V + 1)^j mod buckets of table n (n = 2..ngram)."""

    def __init__(self, config):
        super().__init__()
        self.pad, self.buckets = config.vocab_size, config.ngram_buckets
        self.tables = nn.ModuleList(nn.Embedding(config.ngram_buckets, config.n_embd)
                                    for _ in range(2, config.ngram + 1))

    def forward(self, idx):
        idx = idx.long()  # the hash reaches vocab_size * buckets, past int32 for large tables
        k, (B, T) = len(self.tables), idx.shape
        tokens = torch.cat((torch.full((B, k), self.pad, dtype=idx.dtype, device=idx.device), idx), dim=1)
        h, base, out = idx % self.buckets, 1, 0
        for i, table in enumerate(self.tables):
            base = base * (self.pad + 1) % self.buckets
            h = (h + tokens[:, k - 1 - i:k - 1 - i + T] * base) % self.buckets
            out = out + table(h)
        return out


class GPTSmallPreTrainedModel(PreTrainedModel):
    config_class = GPTSmallConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint


class GPTSmallForCausalLM(GPTSmallPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        C = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(C, bias=config.bias),
        ))
        if config.ngram > 1:
            self.transformer["ngram"] = NgramEmbeddings(config)
        if config.pos_encoding == "learned":
            self.transformer["wpe"] = nn.Module()
            self.transformer["wpe"].weight = nn.Parameter(torch.zeros(config.block_size, C))
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if not config.tie_embeddings:
            self._tied_weights_keys = {}
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("gpt-small's exported model does not support padding: pass one prompt, or prompts of one length")
        cfg = self.config
        B, T = input_ids.shape
        x = self.transformer.wte(input_ids)
        if cfg.ngram > 1:
            x = x + self.transformer.ngram(input_ids)
        rope = None
        if cfg.pos_encoding == "learned":
            x = x + self.transformer.wpe.weight[:T]
        elif cfg.pos_encoding == "sinusoidal":
            # Vaswani et al.: token embeddings times sqrt(n_embd), then the fixed table
            x = x * math.sqrt(cfg.n_embd) + sinusoidal_table(T, cfg.n_embd).to(x.device, x.dtype)
        else:
            hs = cfg.n_embd // cfg.n_head
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
            freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq).to(x.device)
            rope = (freqs.cos(), freqs.sin())
        for block in self.transformer.h:
            x = block(x, rope)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # the last block_size tokens at positions 0..block_size-1, as gpt-small's generate; their
        # part of the mask goes along, so that forward refuses padding instead of reading it as text
        window = {"input_ids": input_ids[:, -self.config.block_size:]}
        if attention_mask is not None:
            window["attention_mask"] = attention_mask[:, -self.config.block_size:]
        return window

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # no KV cache: generate passes none
