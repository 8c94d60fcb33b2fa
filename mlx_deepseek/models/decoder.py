"""One decoder for every family: blocks chosen by ModelArgs (MHA/GQA or MLA; dense MLP or DeepSeekMoE)."""

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from ..config import ModelArgs
from .attention import Attention, MultiHeadLatentAttention
from .moe import MLP, DeepSeekMoE
from .mtp import MultiTokenPrediction


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(args) if args.uses_mla else Attention(args)
        self.mlp = DeepSeekMoE(args, layer) if args.is_moe_layer(layer) else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, x: mx.array, mask: Optional[mx.array], cache: Optional[Any] = None, last_only: bool = False
    ) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        if last_only:  # the cache is filled; only the last position goes on
            h = h[:, -1:, :]
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask(h: mx.array, cache: Optional[Any], mla: bool):
    """Causal mask for L new tokens after the cached ones (an array for MLA, which adds RoPE scores to it)."""
    return create_attention_mask(h, cache, return_array=mla)


class DeepSeekModel(nn.Module):
    """Token embedding, the decoder blocks and the final RMSNorm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mla = args.uses_mla
        self.pipeline = None  # a parallel.PipelineStage when the layers are split over ranks (self.layers: this rank's)

    def __call__(self, inputs: mx.array, cache: Optional[list] = None, last_only: bool = False) -> mx.array:
        """Final-normed hidden states [B, L, D]; with `last_only` (prefill) those of the last position,
        skipping the last block's feed-forward on the others."""
        h = self.embed_tokens(inputs)
        cache = cache or [None] * len(self.layers)
        mask = attention_mask(h, cache[0], self.mla)
        stage = self.pipeline
        if stage is not None:
            h = stage.receive(h)
        last = len(self.layers) - 1 if stage is None or stage.last else -1
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, mask, c, last_only=last_only and i == last)
        if stage is not None:
            h = stage.pass_on(h, last_only)
        return self.norm(h)


class Model(nn.Module):
    """The causal LM: `model(ids[B, L], cache)` -> logits [B, L, vocab]; `mtp` holds the MTP modules."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DeepSeekModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.mtp = [
            MultiTokenPrediction(args, DecoderLayer(args, args.num_hidden_layers + k))
            for k in range(args.num_nextn_predict_layers)
        ]

    def __call__(self, inputs: mx.array, cache: Optional[list] = None) -> mx.array:
        return self.logits(self.model(inputs, cache))

    def logits(self, hidden: mx.array) -> mx.array:
        """The output head (shared by the MTP modules)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def mtp_step(self, hidden: mx.array, ahead: mx.array, k: int = 0, cache=None, at=None) -> tuple[mx.array, mx.array]:
        """MTP module k (0-based) on the hidden states h^{k-1}_i of the module before it (the main model's final-
        normed ones for k = 0) and the tokens t_{i+k+1}: its own hidden states h^k_i and their logits, for
        t_{i+k+2}. hidden [B, L, D] and ahead [B, L] are aligned position by position. `at` (an int or a 0-d
        array): the logits of that one position only, [B, vocab] (drafting needs no others: the output head is
        the widest matrix of a step); None: all of them, [B, L, vocab]."""
        mask = attention_mask(hidden, cache, self.args.uses_mla)
        h = self.mtp[k](hidden, self.model.embed_tokens(ahead), mask, cache)
        return h, self.logits(h if at is None else h[:, at])

    def set_routing_trace(self, trace) -> None:
        """Attach a RoutingTrace to every MoE layer (main model and MTP), or detach with None."""
        for _, m in self.named_modules():
            if isinstance(m, DeepSeekMoE):
                m.trace = trace

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> list:
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.layers]
