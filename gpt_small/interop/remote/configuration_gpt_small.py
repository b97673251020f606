"""Configuration of a gpt-small model exported for Hugging Face transformers (trust_remote_code).

Written by `gpt-small export` next to modeling_gpt_small.py for the models no standard
architecture expresses (hashed n-gram input tables, QK-norm). Self-contained: it imports
transformers only, never gpt_small. The fields are gpt-small's GPTConfig fields, same names.
"""

from transformers import PretrainedConfig


class GPTSmallConfig(PretrainedConfig):
    model_type = "gpt_small"

    def __init__(self, vocab_size=128, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=True,
                 activation="relu", mlp_ratio=4, pos_encoding="learned", rope_theta=10000.0,
                 tie_embeddings=True, qk_norm=False, ngram=1, ngram_buckets=16384, **kwargs):
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.bias = bias
        self.activation = activation
        self.mlp_ratio = mlp_ratio
        self.pos_encoding = pos_encoding
        self.rope_theta = rope_theta
        self.tie_embeddings = tie_embeddings
        self.qk_norm = qk_norm
        self.ngram = ngram
        self.ngram_buckets = ngram_buckets
        # what generic transformers code looks for (no max_position_embeddings: generation slides its
        # window past block_size, so it has no maximum length)
        self.hidden_size = n_embd
        self.num_hidden_layers = n_layer
        self.num_attention_heads = n_head
        kwargs["tie_word_embeddings"] = tie_embeddings
        super().__init__(**kwargs)
