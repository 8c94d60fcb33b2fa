"""A KV cache of fixed capacity, so a decode step has the same shapes every token and compiles once."""

from __future__ import annotations

import mlx.core as mx

from ..config import ModelArgs


def cache_widths(args: ModelArgs) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, width) of what a layer caches as keys and values: MLA caches one row per token, [c_KV; k_pe]
    (one 'head', as FlashMLA's cache), and no values."""
    if args.uses_mla:
        return (1, args.kv_lora_rank + args.qk_rope_head_dim), (1, 0)
    return (args.num_key_value_heads, args.attention_head_dim), (args.num_key_value_heads, args.attention_head_dim)


class StaticKVCache:
    """Keys and values in buffers of `capacity` positions; `offset` is an array, written in place with
    slice_update, and attention masks the unwritten tail. All its arrays live in `state` (a dict), which a
    compiled decode step takes as implicit input and output."""

    def __init__(self, args: ModelArgs, batch: int, capacity: int, dtype: mx.Dtype):
        (hk, dk), (hv, dv) = cache_widths(args)
        self.state = {
            "keys": mx.zeros((batch, hk, capacity, dk), dtype),
            "values": mx.zeros((batch, hv, capacity, dv), dtype),
            "offset": mx.array(0, mx.int32),
        }

    @classmethod
    def wrap(cls, state: dict) -> "StaticKVCache":
        """A cache over existing state (inside a compiled step)."""
        cache = cls.__new__(cls)
        cache.state = dict(state)
        return cache

    @classmethod
    def wrap_layers(cls, states: list[dict]) -> list["StaticKVCache"]:
        """Caches over a model's layer states inside a compiled step. The layers advance together, so they share
        the first one's offset: the graph computes each expression of the offset once, not once per layer."""
        offset = states[0]["offset"]
        return [cls.wrap(dict(s, offset=offset)) for s in states]

    @property
    def offset(self) -> mx.array:
        return self.state["offset"]

    @property
    def capacity(self) -> int:
        return self.state["keys"].shape[2]

    @property
    def length(self) -> int:
        return self.state["offset"].item()

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        s, offset = self.state, self.state["offset"]
        start = offset[None]
        s["keys"] = mx.slice_update(s["keys"], keys, start, axes=(2,))
        if values.shape[-1]:  # MLA's values are empty (not a graph node per layer and step)
            s["values"] = mx.slice_update(s["values"], values, start, axes=(2,))
        s["offset"] = offset + keys.shape[2]
        return s["keys"], s["values"]

    def make_mask(self, n: int, return_array: bool = False, **_) -> mx.array:
        """[n, capacity]: new token i sees positions up to offset + i."""
        rows = self.state["offset"] + mx.arange(n)[:, None]
        return mx.arange(self.capacity)[None] <= rows

    def ensure(self, capacity: int) -> None:
        """Grow (outside any compiled step) to hold `capacity` positions."""
        extra = capacity - self.capacity
        if extra > 0:
            for k in ("keys", "values"):
                a = self.state[k]
                self.state[k] = mx.concatenate([a, mx.zeros((*a.shape[:2], extra, a.shape[3]), a.dtype)], axis=2)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        self.state["offset"] = self.state["offset"] - n
        return n
