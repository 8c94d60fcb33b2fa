"""Multi-Token Prediction (DeepSeek-V3 §2.2)."""

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelArgs


class MultiTokenPrediction(nn.Module):
    """MTP module k: h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})], h_i^k = TRM_k(h'_i).

    `eh_proj` is M_k (input order: embedding, then hidden state, as the V3 release and vLLM use it),
    `block` is TRM_k, `norm` is the shared head's norm; embedding and output head are the main model's.
    """

    def __init__(self, args: ModelArgs, block: nn.Module):
        super().__init__()
        self.enorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.block = block
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, hidden: mx.array, next_embeds: mx.array, mask: Optional[mx.array], cache: Optional[Any] = None
    ) -> mx.array:
        h = self.eh_proj(mx.concatenate([self.enorm(next_embeds), self.hnorm(hidden)], axis=-1))
        return self.norm(self.block(h, mask, cache))
