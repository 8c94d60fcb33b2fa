"""`evaluate` and `mlx-deepseek eval` on the bundled model (a few problems, so it stays fast)."""

import json

import mlx_deepseek
from mlx_deepseek.cli import main
from mlx_deepseek.evaluate import evaluate


def test_evaluate_reports_quality_and_optionally_speed():
    model, tok = mlx_deepseek.load(None)
    r = evaluate(model, tok, n=4, batch_size=4, max_tokens=200, speed_samples=1)
    assert r["n"] == 4 and all(0.0 <= r[k] <= 1.0 for k in ("accuracy", "format", "language"))
    assert r["format"] == 1.0  # the bundled model always thinks, then boxes its answer
    assert r["decode_tps"] > 0 and 0.0 <= r["mtp_acceptance"] <= 1.0
    assert len(r["expert_load_max_over_mean"]) == sum(model.args.is_moe_layer(i) for i in range(model.args.num_hidden_layers))
    quiet = evaluate(model, tok, n=2, batch_size=2, max_tokens=200, speed_samples=0)
    assert "decode_tps" not in quiet and "mtp_speedup" not in quiet


def test_eval_command_without_speed_samples(capsys):
    assert main(["eval", "--n", "2", "--speed-samples", "0", "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "tok/s" not in out
    assert main(["eval", "--n", "2", "--speed-samples", "0", "--max-tokens", "200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2


def test_sampled_accuracy_and_the_kind_breakdown(capsys):
    """--samples K: pass@1 over K sampled answers per problem and pass@K (>= it); `by_kind` splits the greedy
    accuracy by kind and level (their problem-weighted mean is the accuracy)."""
    model, tok = mlx_deepseek.load(None)
    r = evaluate(model, tok, n=3, batch_size=4, max_tokens=200, speed_samples=0, samples=2, temperature=1.0)
    assert 0.0 <= r["sampled_accuracy"] <= r["pass_at_k"] <= 1.0 and r["samples"] == 2
    from mlx_deepseek.train import tasks

    keys = [f"{e.problem.kind}{e.problem.level}" for e in tasks.generate(3, split="heldout", seed=12345)]
    assert set(r["by_kind"]) == set(keys) == set(r["sampled_by_kind"])
    assert abs(sum(r["by_kind"][k] for k in keys) / 3 - r["accuracy"]) < 1e-3
    assert main(["eval", "--n", "2", "--speed-samples", "0", "--max-tokens", "200", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "by kind and level" in out and "pass@2" in out
