"""ModelArgs: every config dialect, defaults for missing keys, clear errors."""

import json

import pytest
from conftest import FAMILY_FIXTURES, FIXTURES

from mlx_deepseek import ConfigError, ModelArgs

V2_LITE = {  # DeepSeek-V2-Lite's config.json (hub spelling), widths as released
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax", "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_fixture_configs_parse(name):
    args = ModelArgs.from_file(FIXTURES / name)
    assert args.model_type == json.loads((FIXTURES / name / "config.json").read_text())["model_type"]


def test_v2_lite_hub_config():
    args = ModelArgs.from_dict(V2_LITE)
    assert args.uses_mla and args.q_lora_rank is None
    assert args.rope_scaling["rope_type"] == "yarn" and args.rope_scaling["factor"] == 40
    assert [args.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert args.kv_cache_bytes_per_token(2) == (512 + 64) * 27 * 2


def test_v2_without_rope_scaling_and_q_lora_rank_zero():
    cfg = {k: v for k, v in V2_LITE.items() if k != "rope_scaling"}
    cfg["q_lora_rank"] = 0
    args = ModelArgs.from_dict(cfg)
    assert args.rope_scaling is None and args.q_lora_rank is None


def test_transformers5_spelling_equals_hub_spelling():
    hub = ModelArgs.from_dict(V2_LITE)
    cfg = {k: v for k, v in V2_LITE.items() if k not in ("rope_scaling", "rope_theta")}
    rs = dict(V2_LITE["rope_scaling"])
    rs["rope_type"] = rs.pop("type")
    cfg["rope_parameters"] = {**rs, "rope_theta": 10000.0}
    t5 = ModelArgs.from_dict(cfg)
    assert (t5.rope_theta, t5.rope_scaling) == (hub.rope_theta, hub.rope_scaling)


def test_default_rope_parameters_mean_plain_rope():
    args = ModelArgs.from_dict({**_llama(), "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert args.rope_scaling is None and args.rope_theta == 5e5


def _llama(**kw):
    return {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 32, **kw}


@pytest.mark.parametrize(
    "config, field",
    [
        ({"model_type": "mistral"}, "model_type='mistral'"),
        (_llama(num_key_value_heads=3), "num_key_value_heads=3"),
        (_llama(hidden_size=18), "num_attention_heads=4"),
        (_llama(rope_scaling={"type": "longrope", "factor": 2.0}), "rope_scaling.rope_type='longrope'"),
        (_llama(rope_scaling={"type": "yarn"}), "rope_scaling.factor=None"),
        ({**V2_LITE, "topk_method": "random"}, "topk_method='random'"),
        ({**V2_LITE, "scoring_func": "tanh"}, "scoring_func='tanh'"),
        ({**V2_LITE, "num_experts_per_tok": 65}, "num_experts_per_tok=65"),
        ({**V2_LITE, "topk_method": "group_limited_greedy", "n_group": 5, "topk_group": 2}, "n_group=5"),
        ({**V2_LITE, "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 9}, "topk_group=9"),
        ({**V2_LITE, "kv_lora_rank": 512, "qk_rope_head_dim": 63}, "qk_rope_head_dim=63"),
        (_llama(vocab_size=0), "vocab_size=0"),
    ],
)
def test_bad_config_names_field_and_value(config, field):
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dict(config)
    assert field in str(e.value)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"config.json: model_type='gpt2'"):
        ModelArgs.from_file(tmp_path)
