"""`mlx-deepseek info` and the command's error handling."""

import json

from conftest import FIXTURES

from mlx_deepseek.cli import main
from mlx_deepseek.info import describe


def test_info_on_released_v3_and_v2_lite_configs():
    v3 = describe(FIXTURES / "configs" / "deepseek-v3")
    assert round(v3["parameters"] / 1e9) == 671 and round(v3["active_parameters"] / 1e9) == 37
    assert v3["kv_cache_bytes_per_token"] == (512 + 64) * 61 * 2
    lite = describe(FIXTURES / "configs" / "deepseek-v2-lite")
    assert round(lite["parameters"] / 1e8) == 157 and round(lite["active_parameters"] / 1e8) == 25  # 15.7B / 2.4B
    assert lite["kv_cache_bytes_per_token"] == (512 + 64) * 27 * 2
    assert lite["mha_kv_cache_bytes_per_token"] == 16 * (128 + 64 + 128) * 27 * 2


def test_info_command_json(capsys):
    assert main(["info", str(FIXTURES / "deepseek_v3_fp8"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model_type"] == "deepseek_v3" and d["attention"] == "MLA"
    assert d["quantization"].startswith("FP8") and d["dtypes"]["F8_E4M3"] > 0
    assert 0 < d["active_parameters"] < d["parameters"] and d["mtp_parameters"] > 0


def test_info_command_text_and_errors(capsys, tmp_path):
    assert main(["info", str(FIXTURES / "llama_gqa")]) == 0
    out = capsys.readouterr().out
    assert "GQA" in out and "KV cache" in out
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["info", str(tmp_path)]) == 2
    assert "model_type='bert'" in capsys.readouterr().err


def test_info_defaults_to_the_bundled_model(capsys):
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["path"].endswith("nano-r1") and d["model_type"] == "deepseek_v3" and d["mtp_parameters"] > 0
    assert d["quantization"].startswith("affine")


def test_train_plot_labels_runs_by_folder_or_copied_file_name(tmp_path, monkeypatch):
    (tmp_path / "run1").mkdir()
    files = [tmp_path / "run1" / "metrics.jsonl", tmp_path / "grpo-s8-run2.metrics.jsonl"]
    row = {"step": 1, "reward": 0.5, "rewards/accuracy": 0.4, "completion_length": 10.0}
    for f in files:
        f.write_text(json.dumps({"step": 0, "eval_accuracy": 0.5, "eval_format": 1.0}) + "\n" + json.dumps(row) + "\n")
    seen = {}

    def fake_plot(runs, out):
        seen["labels"] = [label for label, _ in runs]
        return out

    monkeypatch.setattr("mlx_deepseek.train.plot.plot_grpo", fake_plot)
    assert main(["train", "plot", "--grpo", *map(str, files), "-o", str(tmp_path / "c.png")]) == 0
    assert seen["labels"] == ["run1", "grpo-s8-run2"]


def test_bench_generate_reports_both_engines_and_paired_ratios(capsys):
    from mlx_deepseek.bench import format_generate

    args = ["bench", "generate", "--layers", "2", "--scale", "0.0625", "--bits", "0", "--prompt-tokens", "8",
            "--gen-tokens", "6", "--trials", "2", "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    rows = r["results"]
    assert set(rows) == {"mlx-lm", "mlx-deepseek", "mlx-deepseek --mtp"}
    assert rows["mlx-lm"]["decode_ratio"] == rows["mlx-lm"]["decode_ratio_median"] == 1.0
    for row in rows.values():
        assert row["decode_tps"] > 0 and row["prefill_tps"] > 0 and row["decode_ratio_median"] > 0
    assert 0 <= rows["mlx-deepseek --mtp"]["mtp_acceptance"] <= 1
    assert "median of trials" in format_generate(r)
