"""LoRA / DoRA adapters on the MLA and expert projections, built from mlx-lm's adapter layers (wrapped, not forked).

- `apply_lora(model, LoraSettings)`: freezes the model, then wraps the chosen projections of the decoder layers:
  nn.Linear / QuantizedLinear -> mlx-lm `LoRALinear` (or `DoRALinear`), routed-expert stacks (SwitchLinear /
  QuantizedSwitchLinear) -> mlx-lm `LoRASwitchLinear` (or `DoRASwitchLinear`), MLA's per-head W_UK / W_UV
  (MultiLinear, `embed_q` / `unembed_out`) -> `LoRAMultiLinear` (or `DoRAMultiLinear`). Only the adapters
  train; the router and its `e_score_correction_bias` stay frozen. The MTP module is not adapted.
- `adapters_disabled(model)`: the base model, for the reference log-probs of GRPO's KL term (the adapters are
  swapped out, not zeroed, so DoRA's magnitude vector is out too).
- `adapters_merged(model)`: the adapters folded into float copies of their weights, for GRPO's rollouts.
- `save_adapters` / `load_adapters`: adapters.safetensors + adapter_config.json.
- `fuse(model, dequantize)`: adapters folded into the weights (re-quantized like the base unless `dequantize`).
- `dequantize(model)`: a quantized model to float (for training on CPU, where float matmuls are the fast ones).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
from mlx_lm.utils import dequantize_model

ADAPTER_FILE, ADAPTER_CONFIG = "adapters.safetensors", "adapter_config.json"

# Module names (the last part of the path) adapted by default: MLA's q/kv down- and up-projections (W_UK, W_UV
# per head) and output, MHA's projections (V1/V2 dense families), the routed experts, the shared experts and
# dense FFNs.
DEFAULT_KEYS = (
    "q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "embed_q", "unembed_out", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "gate_up_proj", "down_proj",
)


def _dense(linear: nn.Module) -> mx.array:
    """A stacked layer's weight [N, out, in] (experts or heads), dequantized if it is quantized."""
    if "scales" in linear:
        return mx.dequantize(linear.weight, linear.scales, linear.get("biases"), linear.group_size, linear.bits,
                             linear.mode)
    return linear.weight


def _stacked_dims(linear: nn.Module) -> tuple[int, int, int]:
    """(in, out, N) of a stacked layer (experts or heads), read from its (packed) weight's shape."""
    n, out_dims, cols = linear.weight.shape
    return (cols * 32 // linear.bits if "scales" in linear else cols), out_dims, n


def _adapted_weight(adapter: nn.Module) -> mx.array:
    """A stacked adapter's base weight plus its low-rank update, scale * B A, per expert or head [N, out, in]."""
    return _dense(adapter.linear) + (adapter.scale * adapter.lora_b) @ adapter.lora_a


def _stacked_like(linear: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    """A float layer of `linear`'s kind holding `weight` [N, out, in], re-quantized like it unless `dequantize`."""
    n, out_dims, in_dims = weight.shape
    kind = SwitchLinear if isinstance(linear, (SwitchLinear, QuantizedSwitchLinear)) else MultiLinear
    fused = kind(in_dims, out_dims, n)
    fused.weight = weight
    if "scales" in linear and not dequantize:
        return fused.to_quantized(group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    return fused


class LoRAMultiLinear(nn.Module):
    """LoRA on MLA's per-head W_UK / W_UV (mlx-lm's MultiLinear, weight [heads, out, in]): head h's weight gets
    scale * B_h A_h, with A [heads, r, in] and B [heads, out, r] laid out as mlx-lm's LoRASwitchLinear. The
    absorbed attention also calls it untransposed (x @ W), which then uses the transposed update."""

    @classmethod
    def from_base(cls, linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        adapter = cls(*_stacked_dims(linear), r, dropout, scale)
        adapter.linear = linear
        return adapter

    def __init__(self, input_dims: int, output_dims: int, num_heads: int, r: int = 8, dropout: float = 0.0,
                 scale: float = 20.0):
        super().__init__()
        self.linear = MultiLinear(input_dims, output_dims, num_heads)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / input_dims**0.5
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(num_heads, r, input_dims))
        self.lora_b = mx.zeros((num_heads, output_dims, r))

    def __call__(self, x, transpose=True):
        y = self.linear(x, transpose)
        if transpose:
            z = (self.dropout(x) @ self.lora_a.swapaxes(-1, -2)) @ self.lora_b.swapaxes(-1, -2)
        else:
            z = (self.dropout(x) @ self.lora_b) @ self.lora_a
        return y + (self.scale * z).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        return _stacked_like(self.linear, _adapted_weight(self), dequantize)


class _StackedDoRA:
    """DoRA for the stacked adapters (experts, heads): every row of the adapted weight W + scale * B A is
    normalised and scaled by a learned magnitude m [N, out], initialised to the base rows' norms; the norm is a
    constant for the gradient, as in mlx-lm's DoRALinear."""

    @classmethod
    def from_base(cls, linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        adapter = cls(*_stacked_dims(linear), r, dropout, scale)
        adapter.linear = linear
        adapter.m = mx.linalg.norm(_dense(linear).astype(mx.float32), axis=-1)
        return adapter

    def _adapted(self) -> tuple[mx.array, mx.array]:
        """(adapted weight [N, out, in], row factor m / ||row|| [N, out])."""
        w = _adapted_weight(self)
        return w, self.m / mx.stop_gradient(mx.linalg.norm(w, axis=-1))

    def fuse(self, dequantize: bool = False) -> nn.Module:
        w, factor = self._adapted()
        return _stacked_like(self.linear, (factor[..., None] * w).astype(w.dtype), dequantize)


class DoRASwitchLinear(_StackedDoRA, LoRASwitchLinear):
    """DoRA on a routed-expert stack (mlx-lm has DoRA for single linears only)."""

    def __call__(self, x, indices, sorted_indices=False):
        y = super().__call__(x, indices, sorted_indices)  # [..., k, 1, out] for indices [..., k]
        return y * self._adapted()[1][indices][..., None, :].astype(x.dtype)


class DoRAMultiLinear(_StackedDoRA, LoRAMultiLinear):
    """DoRA on MLA's per-head W_UK / W_UV."""

    def __call__(self, x, transpose=True):
        factor = self._adapted()[1][:, None, :].astype(x.dtype)  # [heads, 1, out]: scales the weight's rows
        if transpose:
            return super().__call__(x, transpose) * factor
        return super().__call__(x * factor, transpose)  # x @ (diag(f) W) = (x f) @ W


ADAPTER_TYPES = (LoRALinear, DoRALinear, LoRASwitchLinear, LoRAMultiLinear)


@dataclass
class LoraSettings:
    rank: int = 8
    scale: float = 20.0  # mlx-lm's convention: the update is scale * (x A) B
    dropout: float = 0.0
    dora: bool = False
    keys: tuple = DEFAULT_KEYS
    layers: int = 0  # adapt the last N decoder layers (0: all)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        d = dict(d)
        d["keys"] = tuple(d.get("keys", DEFAULT_KEYS))
        return cls(**d)

    @classmethod
    def for_finetune(cls, finetune: str, fields: dict) -> "LoraSettings | None":
        """The adapters of a `--finetune` choice with these settings (None: full fine-tuning, no adapters)."""
        if finetune == "full":
            return None
        return cls.from_dict({**fields, "dora": finetune == "dora" or fields.get("dora", False)})


def _adapter_for(module: nn.Module, s: LoraSettings):
    kw = dict(r=s.rank, scale=s.scale, dropout=s.dropout)
    if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        return (DoRASwitchLinear if s.dora else LoRASwitchLinear).from_base(module, **kw)
    if isinstance(module, (MultiLinear, QuantizedMultiLinear)):
        return (DoRAMultiLinear if s.dora else LoRAMultiLinear).from_base(module, **kw)
    if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        return (DoRALinear if s.dora else LoRALinear).from_base(module, **kw)
    return None


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze `model` and wrap the chosen projections with adapters; returns the adapted module paths."""
    model.freeze()
    layers = model.model.layers
    start = len(layers) - settings.layers if settings.layers else 0
    new = []
    for i, layer in enumerate(layers):
        if i < start:
            continue
        for name, m in layer.named_modules():
            if name.split(".")[-1] in settings.keys and not isinstance(m, ADAPTER_TYPES):
                a = _adapter_for(m, settings)
                if a is not None:
                    new.append((f"model.layers.{i}.{name}", a))
    if not new:
        raise ValueError(f"no projection named one of {settings.keys} to adapt")
    model.update_modules(tree_unflatten(new))
    return [k for k, _ in new]


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(k, m) for k, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]


def has_adapters(model: nn.Module) -> bool:
    return bool(adapter_modules(model))


@contextmanager
def _swapped(model: nn.Module, adapted: list, replacement):
    """Within the block each (path, adapter) of `adapted` is replaced by replacement(adapter); then restored."""
    model.update_modules(tree_unflatten([(k, replacement(m)) for k, m in adapted]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(adapted))


def adapters_disabled(model: nn.Module):
    """Within the block the model is its base: every adapter is swapped for the module it wraps."""
    return _swapped(model, adapter_modules(model), lambda m: m.linear)


def adapters_merged(model: nn.Module):
    """Within the block every adapter over a float weight is folded into a copy of it (W + scale B A: one matmul per
    projection instead of three, for sampling); adapters over quantized weights stay as they are (folding them would
    re-quantize). Outside the block the adapters are back, untouched."""
    floats = [(k, m) for k, m in adapter_modules(model) if "scales" not in m.linear]
    return _swapped(model, floats, lambda m: m.fuse(dequantize=True))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model: nn.Module, folder: Path, settings: LoraSettings) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / ADAPTER_FILE), adapter_weights(model))
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"fine_tune_type": "dora" if settings.dora else "lora",
                                                     "lora_parameters": asdict(settings)}, indent=2))


def read_adapter_settings(folder: Path) -> LoraSettings:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG} (not an adapter folder)")
    return LoraSettings.from_dict(json.loads(path.read_text())["lora_parameters"])


def load_adapters(model: nn.Module, folder: Path, settings: LoraSettings | None = None) -> LoraSettings:
    """Wrap `model` (if it has no adapters yet) as the folder's config says and load the adapter weights."""
    settings = settings or read_adapter_settings(folder)
    if not has_adapters(model):
        apply_lora(model, settings)
    model.load_weights(list(mx.load(str(Path(folder) / ADAPTER_FILE)).items()), strict=False)
    mx.eval(model.parameters())
    return settings


def fuse(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every adapter into its base weight (quantized bases are re-quantized unless `dequantize`)."""
    fused = [(k, m.fuse(dequantize=dequantize)) for k, m in adapter_modules(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Every quantized layer (linear, embedding, expert stack, MLA per-head) back to float; args.quantization None."""
    dequantize_model(model)
    multi = [(name, _stacked_like(m, _dense(m), dequantize=True))
             for name, m in model.named_modules() if isinstance(m, QuantizedMultiLinear)]
    if multi:
        model.update_modules(tree_unflatten(multi))
    model.args.quantization = None
    return model

