"""LoRA / DoRA adapters on the MLA and expert projections, built from mlx-lm's adapter layers (wrapped, not forked).

- `apply_lora(model, LoraSettings)`: freezes the model, then wraps the chosen projections of the decoder layers:
  nn.Linear / QuantizedLinear -> mlx-lm `LoRALinear` (or `DoRALinear`), routed-expert stacks (SwitchLinear /
  QuantizedSwitchLinear) -> `LoRASwitchLinear` (mlx-lm has no DoRA for expert stacks: they get LoRA). Only the
  adapters train; the router and its `e_score_correction_bias` stay frozen. The MTP module is not adapted.
- `adapters_disabled(model)`: the base model, for the reference log-probs of GRPO's KL term (the adapters are
  swapped out, not zeroed, so DoRA's magnitude vector is out too).
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
ADAPTER_TYPES = (LoRALinear, DoRALinear, LoRASwitchLinear)

# Module names (the last part of the path) adapted by default: MLA's q/kv down- and up-projections and output,
# MHA's projections (V1/V2 dense families), the routed experts, the shared experts and dense FFNs.
DEFAULT_KEYS = (
    "q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj",
)


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


def _adapter_for(module: nn.Module, s: LoraSettings):
    kw = dict(r=s.rank, scale=s.scale, dropout=s.dropout)
    if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        return LoRASwitchLinear.from_base(module, **kw)
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
def adapters_disabled(model: nn.Module):
    """Within the block the model is its base: every adapter is swapped for the module it wraps."""
    adapted = adapter_modules(model)
    model.update_modules(tree_unflatten([(k, m.linear) for k, m in adapted]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(adapted))


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
    multi = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedMultiLinear):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
            heads, out_dims, in_dims = w.shape
            new = MultiLinear(in_dims, out_dims, heads)
            new.weight = w
            multi.append((name, new))
    if multi:
        model.update_modules(tree_unflatten(multi))
    model.args.quantization = None
    return model

