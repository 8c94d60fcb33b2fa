"""`ModelArgs`: one description of every DeepSeek family, read from any config.json dialect.

The hub's config.json files come in several spellings: the original releases write
`rope_theta` + `rope_scaling` ({"type": "yarn", ...}); transformers 5 writes `rope_parameters`
({"rope_type": ..., "rope_theta": ...}); older files omit optional keys. `ModelArgs.from_dict`
normalises all of them into one set of fields and checks them, naming the field and value it
rejects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A config.json that this project cannot build a model from."""


FAMILIES = {
    "llama": "DeepSeek-LLM V1 / R1-Distill-Llama (LLaMA blocks)",
    "qwen2": "R1-Distill-Qwen (Qwen2.5 blocks)",
    "deepseek": "DeepSeekMoE",
    "deepseek_v2": "DeepSeek-V2 (MLA + DeepSeekMoE)",
    "deepseek_v3": "DeepSeek-V3 / R1 (MLA + DeepSeekMoE, aux-loss-free routing, MTP)",
}

# Defaults for keys a config.json may omit, per family (those of the reference implementations).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {"rope_theta": 1_000_000.0},
    "deepseek": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False},
    "deepseek_v2": {
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "moe_intermediate_size": 1407,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
    },
    "deepseek_v3": {
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "moe_intermediate_size": 2048,
        "first_k_dense_replace": 3,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "num_nextn_predict_layers": 1,
    },
}

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "linear", "yarn", "llama3")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # normalised: always has "rope_type"; None when plain RoPE
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    # Multi-head latent attention (V2, V3); kv_lora_rank None means MHA/GQA.
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None
    qk_nope_head_dim: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    # DeepSeekMoE; n_routed_experts None means dense.
    n_routed_experts: Optional[int] = None
    n_shared_experts: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # Multi-Token Prediction (V3)
    num_nextn_predict_layers: int = 0
    # MLX quantization block (mlx-lm format) of a converted checkpoint
    quantization: Optional[dict] = None
    torch_dtype: Optional[str] = None
    extra: dict = field(default_factory=dict, repr=False)

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no config.json; a model folder needs one (Hugging Face layout)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        config = dict(config)
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(
                f"model_type={model_type!r} is not supported; expected one of {sorted(FAMILIES)}"
            )
        merged = {**_FAMILY_DEFAULTS[model_type], **{k: v for k, v in config.items() if v is not None}}
        # Null MoE/MLA keys mean "absent" in every dialect (q_lora_rank null: V2-Lite).
        for key in ("q_lora_rank", "n_group", "topk_group", "rope_scaling"):
            if key in config and config[key] is None:
                merged.pop(key, None)
        merged["rope_theta"], merged["rope_scaling"] = _read_rope(merged)
        merged.pop("rope_parameters", None)
        if merged.get("q_lora_rank") == 0:
            merged["q_lora_rank"] = None
        if "quantization_config" in merged and "quantization" not in merged:
            qc = merged["quantization_config"]
            if qc.get("quant_method") not in ("fp8", None) and "bits" in qc:
                merged["quantization"] = qc  # mlx-lm writes both spellings
        names = {f.name for f in fields(cls)} - {"extra"}
        args = cls(
            **{k: v for k, v in merged.items() if k in names},
            extra={k: v for k, v in merged.items() if k not in names},
        )
        if model_type in ("llama", "qwen2", "deepseek"):
            args.kv_lora_rank = args.q_lora_rank = None  # these families have no MLA
        if model_type in ("llama", "qwen2"):
            args.n_routed_experts = None
        args._check()
        return args

    # ---- derived quantities ----------------------------------------------------------------
    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def quantization_of(self, path: str) -> dict:
        """The {bits, group_size, mode} of the quantized layer at `path`: its own entry, else the defaults."""
        entry = (self.quantization or {}).get(stored_paths(path)[0])
        return entry if isinstance(entry, dict) else (self.quantization or {})

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeekMoE layout: the first k layers dense, then every `moe_layer_freq`-th layer MoE."""
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes the KV cache grows by per token: MLA caches the latent and k_pe only."""
        if self.uses_mla:
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.num_key_value_heads * self.attention_head_dim
        return per_layer * self.num_hidden_layers * dtype_bytes

    def mha_kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """What full per-head K and V would cost (the MHA equivalent of an MLA model)."""
        if not self.uses_mla:
            return 2 * self.num_attention_heads * self.attention_head_dim * self.num_hidden_layers * dtype_bytes
        per_head = self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim
        return self.num_attention_heads * per_head * self.num_hidden_layers * dtype_bytes

    def to_dict(self) -> dict:
        """The hub spelling of this config (rope_theta + rope_scaling with "type")."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs["type"] = rs.pop("rope_type")
            out["rope_scaling"] = rs
        # null is kept where it means something: an MLA model without q compression (V2-Lite)
        return {k: v for k, v in out.items() if v is not None or (k == "q_lora_rank" and self.uses_mla)}

    # ---- validation --------------------------------------------------------------------------
    def _check(self) -> None:
        def need(cond: bool, name: str, value: Any, why: str) -> None:
            if not cond:
                raise ConfigError(f"{self.model_type}: {name}={value!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, name, value, "must be a positive integer")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads", self.num_key_value_heads,
            f"must divide num_attention_heads={self.num_attention_heads}",
        )
        if self.head_dim is None and not self.uses_mla:
            need(
                self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
                self.num_attention_heads, f"must divide hidden_size={self.hidden_size} (or set head_dim)",
            )
        if self.extra.get("use_sliding_window"):
            need(False, "use_sliding_window", True, "sliding-window attention is not supported")
        if self.uses_mla:
            for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                value = getattr(self, name)
                need(isinstance(value, int) and value > 0, name, value, "MLA needs a positive integer")
            need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim, "RoPE needs an even size")
        if self.n_routed_experts is not None:
            need(self.n_routed_experts > 0, "n_routed_experts", self.n_routed_experts, "must be positive")
            need(
                isinstance(self.num_experts_per_tok, int) and 0 < self.num_experts_per_tok <= self.n_routed_experts,
                "num_experts_per_tok", self.num_experts_per_tok,
                f"must be between 1 and n_routed_experts={self.n_routed_experts}",
            )
            need(
                isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0,
                "moe_intermediate_size", self.moe_intermediate_size, "MoE layers need a positive integer",
            )
            need(self.topk_method in TOPK_METHODS, "topk_method", self.topk_method, f"expected one of {TOPK_METHODS}")
            need(self.scoring_func in SCORING_FUNCS, "scoring_func", self.scoring_func, f"expected one of {SCORING_FUNCS}")
            need(self.moe_layer_freq >= 1, "moe_layer_freq", self.moe_layer_freq, "must be at least 1")
            if self.topk_method == "greedy":
                self.n_group = self.topk_group = 1
            need(
                self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group", self.n_group,
                f"must divide n_routed_experts={self.n_routed_experts}",
            )
            need(1 <= self.topk_group <= self.n_group, "topk_group", self.topk_group, f"must be in 1..n_group={self.n_group}")
            need(
                self.topk_group * (self.n_routed_experts // self.n_group) >= self.num_experts_per_tok,
                "topk_group", self.topk_group,
                f"the {self.topk_group} kept groups hold fewer experts than num_experts_per_tok={self.num_experts_per_tok}",
            )
            if self.model_type == "deepseek_v2" and self.norm_topk_prob:
                # DeepSeek-V2 multiplies by routed_scaling_factor only when it does not renormalise.
                self.routed_scaling_factor = 1.0
        if self.rope_scaling is not None:
            kind = self.rope_scaling["rope_type"]
            need(kind in ROPE_TYPES, "rope_scaling.rope_type", kind, f"expected one of {ROPE_TYPES}")
            need(
                isinstance(self.rope_scaling.get("factor"), (int, float)) and self.rope_scaling["factor"] > 0,
                "rope_scaling.factor", self.rope_scaling.get("factor"), f"{kind} RoPE needs a positive factor",
            )
            if kind == "yarn":
                need(
                    self.rope_scaling.get("truncate", True) is True, "rope_scaling.truncate",
                    self.rope_scaling.get("truncate"), "only the truncated YaRN correction range is supported",
                )
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", self.num_nextn_predict_layers, "must be >= 0")


def _read_rope(config: dict) -> tuple[float, Optional[dict]]:
    """Both spellings -> (rope_theta, normalised scaling dict or None)."""
    theta = config.get("rope_theta", 10000.0)
    scaling = config.get("rope_scaling")
    params = config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"rope_parameters={params!r}: expected an object")
        if "rope_theta" in params:
            theta = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if not scaling:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling={scaling!r}: expected an object or null")
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if kind == "deepseek_yarn":
        kind = "yarn"
    if kind == "default":
        return float(theta), None
    return float(theta), {"rope_type": kind, **scaling}


def stored_paths(path: str) -> tuple[str, ...]:
    """A layer's paths as checkpoints (and their per-layer quantization entries) name it: the routed experts'
    joined W_gate, W_up (`switch_mlp.gate_up_proj`) are stored as `gate_proj` and `up_proj`, quantized alike."""
    if path.endswith(".switch_mlp.gate_up_proj"):
        prefix = path[: -len("gate_up_proj")]
        return prefix + "gate_proj", prefix + "up_proj"
    return (path,)
