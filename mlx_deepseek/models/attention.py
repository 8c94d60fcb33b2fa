"""Attention: multi-head / grouped-query attention (V1, distills) and multi-head latent attention (V2, V3)."""

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.mla import MultiLinear

from ..config import ModelArgs
from . import fastmath
from .rope import make_rope, yarn_softmax_scale


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v with RoPE on q and k; n_kv_heads < n_heads is GQA."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.attention_head_dim
        self.scale = yarn_softmax_scale(args, self.head_dim)
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=args.o_bias)
        self.rope = make_rope(args, self.head_dim, traditional=False)

    def __call__(self, x: mx.array, mask: Optional[mx.array], cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def masked(scores: mx.array, mask: Optional[mx.array]) -> mx.array:
    """Scores with the positions a boolean mask hides set to the dtype's lowest value."""
    if mask is None:
        return scores
    return mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2 §2.1): low-rank joint KV compression with decoupled RoPE.

    c_KV = RMSNorm(W_DKV h), k_pe = RoPE(W_KR h)      (kv_a_proj_with_mqa, kv_a_layernorm)
    c_Q  = RMSNorm(W_DQ h),  [q_nope; q_pe] = W_UQ c_Q (q_a_proj, q_a_layernorm, q_b_proj; or q_proj)
    k_nope = W_UK c_KV (`embed_q`), v = W_UV c_KV (`unembed_out`)

    The cache holds only [c_KV; k_pe] per token. Few new tokens (decoding, speculative
    verification) absorb W_UK into the query (q_nope W_UK scores directly against c_KV) and apply
    W_UV after attention; many (prefill) expand k_nope and v from the latent. Both give the same
    scores q_nope.k_nope + q_pe.k_pe; `absorb_below` is where their costs cross (per key and head,
    absorbed attention costs L*2r, expansion r*(d_nope+d_v) + L*(d_nope+d_v)).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.q_head_dim = args.qk_nope_head_dim + args.qk_rope_head_dim
        self.scale = yarn_softmax_scale(args, self.q_head_dim)
        dim, bias = args.hidden_size, args.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, self.n_heads * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.embed_q = MultiLinear(self.qk_nope_head_dim, self.kv_lora_rank, self.n_heads)  # W_UK^T per head
        self.unembed_out = MultiLinear(self.kv_lora_rank, args.v_head_dim, self.n_heads)  # W_UV per head
        self.o_proj = nn.Linear(self.n_heads * args.v_head_dim, dim, bias=bias)
        self.rope = make_rope(args, self.qk_rope_head_dim, traditional=True)
        r, dv = self.kv_lora_rank, args.qk_nope_head_dim + args.v_head_dim
        self.absorb_below = r * dv / (2 * r - dv) if 2 * r > dv else float("inf")

    def __call__(self, x: mx.array, mask: Optional[mx.array], cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, L, self.n_heads, self.q_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)

        c_kv, k_pe = mx.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank], axis=-1)
        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset=offset)
        k_pe = self.rope(k_pe.reshape(B, 1, L, self.qk_rope_head_dim), offset=offset)  # one shared head
        # what the cache holds: one row [c_KV; k_pe] per token (FlashMLA's layout), [B, 1, L, r + d_rope]
        latent = mx.concatenate([mx.expand_dims(self.kv_a_layernorm(c_kv), 1), k_pe], axis=-1)
        if cache is not None:
            latent, _ = cache.update_and_fetch(latent, latent[..., :0])  # no values: they come from c_KV
            if isinstance(latent, tuple):  # a quantized cache
                latent = mx.dequantize(*latent, group_size=cache.group_size, bits=cache.bits).astype(x.dtype)
        c_kv = latent[..., : self.kv_lora_rank]

        if L < self.absorb_below:  # absorbed: attend in the latent space, then project out with W_UV
            # c_KV is one key/value head shared by all query heads, so the H x L query rows are the rows of one
            # matrix (as FlashMLA decodes), and the query row [q_nope W_UK; q_pe] against the cached row
            # [c_KV; k_pe] gives both score terms in one matmul. MLX's attention kernels would take this (a
            # 576-wide head on V2/V3) as a cuDNN call on CUDA or as the same chain with the keys broadcast.
            rows = (B, 1, self.n_heads * L, -1)
            scores = mx.concatenate([self.embed_q(q_nope), q_pe], axis=-1).reshape(rows) @ latent.swapaxes(-1, -2)
            if mask is not None and L > 1:  # row h * L + l is query l of head h
                mask = mx.broadcast_to(mask, (B, self.n_heads, L, mask.shape[-1])).reshape(rows)
            probs = fastmath.softmax(masked(scores * self.scale, mask))
            out = self.unembed_out((probs @ c_kv).reshape(B, self.n_heads, L, self.kv_lora_rank))
        else:  # expanded: per-head keys and values from the latent; the RoPE scores enter as an additive mask
            k_pe = latent[..., self.kv_lora_rank :]
            pe_scores = masked((q_pe @ k_pe.swapaxes(-1, -2)) * self.scale, mask)
            k_nope = self.embed_q(c_kv, transpose=False)
            v = self.unembed_out(c_kv)
            out = fastmath.attention(q_nope, k_nope, v, self.scale, mask=pe_scores)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
