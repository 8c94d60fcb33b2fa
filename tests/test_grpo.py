"""GRPO: loss and gradients equal TRL's (fixtures made by tests/fixtures/make_grpo_reference.py with TRL's own
code) for every loss type, beta in {0, 0.04}, mu > 1 and the reward scale modes; micro-batches add up to the
batch; LoRA adapters change after a step (and nothing else does); adapters off = the base; fuse; resume
reproduces the same next step; the commands."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_deepseek.cli import main
from mlx_deepseek.train import lora, tasks
from mlx_deepseek.train.grpo import (
    DifficultyFilter, GRPOConfig, GRPOTrainer, Group, PromptStream, RolloutBatch, completion_logps,
    group_advantages, micro_batches, policy_loss,
)
from mlx_deepseek.train.loop import load_for_training, read_metrics
from mlx_deepseek.train.vocab import copy_tokenizer
from mlx_deepseek.weights import save_model
from test_train import tiny_model

FIX = Path(__file__).parent / "fixtures" / "grpo"
REF = np.load(FIX / "loss.npz")
ADV = np.load(FIX / "advantages.npz")
SMALL = dict(steps=2, prompts_per_step=2, group_size=3, max_completion_tokens=6, temperature=1.0, lr=1e-2,
             save_every=1, log_every=1, task_options={"levels": (1, 1)})


def _trl_case_loss(case: str, logits: mx.array):
    P = REF["prompt_ids"].shape[1]
    logps, entropy = completion_logps(logits[:, P - 1:-1], mx.array(REF["completion_ids"]), float(REF["temperature"]))
    return policy_loss(
        logps, mx.array(REF["completion_mask"]), mx.array(REF[f"{case}/advantages"]),
        old_logps=mx.array(REF["old"]) if int(REF[f"{case}/mu"]) > 1 else None, ref_logps=mx.array(REF["ref"]),
        beta=float(REF[f"{case}/beta"]), epsilon=float(REF["epsilon"]), epsilon_high=float(REF["epsilon_high"]),
        loss_type=str(REF[f"{case}/loss_type"]), max_completion_length=int(REF["max_completion_length"]),
        entropy=entropy,
    )


@pytest.mark.parametrize("case", [str(c) for c in REF["cases"]])
def test_loss_and_gradient_equal_trl(case):
    (loss, stats), grad = mx.value_and_grad(lambda x: _trl_case_loss(case, x))(mx.array(REF["logits"]))
    expected = REF[f"{case}/grad"]
    assert abs(loss.item() - float(REF[f"{case}/loss"])) < 1e-6
    assert np.abs(np.array(grad) - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.abs(expected).max() > 1e-3  # a gradient flows
    tokens = stats["tokens"].item()
    for key in ("entropy", "clip_low", "clip_high", "clip_region") + (("kl",) if float(REF[f"{case}/beta"]) else ()):
        assert stats[key].item() / tokens == pytest.approx(float(REF[f"{case}/{key}"]), abs=1e-6), key


def test_the_fixtures_cover_clipping_and_every_setting():
    cases = [str(c) for c in REF["cases"]]
    assert {c.split("_beta")[0] for c in cases} == {"grpo", "bnpo", "dr_grpo", "dapo"}
    assert {c.split("_")[-1] for c in cases} == {"group", "batch", "none"}
    assert any("beta0.0_" in c for c in cases) and any("beta0.04" in c for c in cases)
    assert any(float(REF[f"{c}/clip_region"]) > 0 for c in cases if "mu2" in c)


@pytest.mark.parametrize("case", ["group_plain", "group_unscorable", "batch_plain", "batch_unscorable",
                                  "none_plain", "none_unscorable"])
def test_advantages_equal_trl(case):
    adv, _, zero = group_advantages(ADV[f"{case}/rewards"], ADV["weights"], int(ADV["group_size"]), case.split("_")[0])
    np.testing.assert_allclose(adv, ADV[f"{case}/advantages"], atol=1e-6)
    np.testing.assert_array_equal(zero, ADV[f"{case}/zero_std"])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_add_up_to_the_batch(loss_type):
    """Per-group shares with the batch's totals give the whole batch's loss and gradient (how the trainer
    accumulates)."""
    P, n = REF["prompt_ids"].shape[1], REF["completion_ids"].shape[0]
    ids, mask = mx.array(REF["completion_ids"]), mx.array(REF["completion_mask"])
    adv, old, ref = mx.array(REF["grpo_beta0.04_mu2_group/advantages"]), mx.array(REF["old"]), mx.array(REF["ref"])
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=8)

    def loss(x, rows):
        logps, _ = completion_logps(x[rows, P - 1:-1], ids[rows])
        return policy_loss(logps, mask[rows], adv[rows], old[rows], ref[rows], n_sequences=n,
                           n_tokens=mask.sum(), **kw)[0]

    x = mx.array(REF["logits"])
    whole, g_whole = mx.value_and_grad(lambda x: loss(x, mx.arange(n)))(x)
    parts = [mx.value_and_grad(lambda x: loss(x, mx.arange(i, i + 3)))(x) for i in (0, 3)]
    assert abs(whole.item() - sum(p[0].item() for p in parts)) < 1e-6
    np.testing.assert_allclose(np.array(g_whole), np.array(parts[0][1] + parts[1][1]), atol=1e-6)


# ---- the trainer on a tiny model -----------------------------------------------------------------------
@pytest.fixture
def tiny_folder(tmp_path, tok_dir):
    folder = tmp_path / "tiny"
    model = tiny_model()
    save_model(model, folder, model.args.to_dict())
    copy_tokenizer(tok_dir, folder)
    return folder


def _trainer(folder, out, **changes):
    model, tok, _ = load_for_training(folder)
    return GRPOTrainer(model, tok, GRPOConfig(**{**SMALL, **changes}), out, progress=False, tokenizer_dir=folder)


def _params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_a_lora_step_changes_the_adapters_and_nothing_else(tiny_folder, tmp_path):
    tr = _trainer(tiny_folder, tmp_path / "run", beta=0.04, mu=2, epsilon_high=0.28)
    trainable = {k for k, _ in tree_flatten(tr.model.trainable_parameters())}
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    assert any(".switch_mlp." in k for k in trainable) and any("kv_a_proj_with_mqa" in k for k in trainable)
    assert any(".embed_q." in k for k in trainable) and any(".unembed_out." in k for k in trainable)
    before = _params(tr.model)
    row = tr.train_step()
    after = _params(tr.model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and changed <= trainable
    assert any(k.endswith("lora_b") for k in changed)  # B starts at zero: a real update
    for key in ("reward", "rewards/accuracy", "rewards/format", "rewards/language", "kl", "entropy", "clip_region",
                "completion_length", "truncation", "zero_std_frac", "grad_norm", "load_max_mean"):
        assert key in row, key
    assert 0 < row["rollout_seconds"] < row["step_seconds"]
    # the reference (adapters disabled) is the base model
    x = mx.array([[1, 5, 9, 12]])
    base = tiny_model()
    with lora.adapters_disabled(tr.model):
        np.testing.assert_allclose(np.array(tr.model(x)), np.array(base(x)), atol=1e-5)
    adapted = np.array(tr.model(x))
    assert np.abs(adapted - np.array(base(x))).max() > 1e-6
    with lora.adapters_merged(tr.model):  # what rollouts sample from: the same function, no adapters
        assert not lora.has_adapters(tr.model)
        np.testing.assert_allclose(np.array(tr.model(x)), adapted, atol=1e-5)
    assert {k for k, _ in tree_flatten(tr.model.trainable_parameters())} == trainable
    np.testing.assert_array_equal(np.array(tr.model(x)), adapted)
    lora.fuse(tr.model)
    assert not lora.has_adapters(tr.model)
    np.testing.assert_allclose(np.array(tr.model(x)), adapted, atol=1e-4)


def test_mu_2_keeps_the_log_probs_of_the_weights_before_the_first_update(tiny_folder, tmp_path):
    tr = _trainer(tiny_folder, tmp_path / "mu2", mu=2)
    batch = tr.make_batch()
    tr.prepare(batch)
    before = [np.array(tr.micro_logps(tr.model, mb)[0]) for mb in batch.micro]
    assert not batch.old_logps
    tr.optimizer.update(tr.model, tr.compute_grads(batch)[0])
    assert len(batch.old_logps) == len(batch.micro)
    for kept, fresh in zip(batch.old_logps, before):
        np.testing.assert_allclose(np.array(kept), fresh, rtol=1e-5, atol=1e-6)
    moved = [np.array(tr.micro_logps(tr.model, mb)[0]) for mb in batch.micro]
    assert max(np.abs(m - b).max() for m, b in zip(moved, before)) > 1e-6  # the update moved them; old ones stay
    tr.compute_grads(batch)
    for kept, fresh in zip(batch.old_logps, before):
        np.testing.assert_allclose(np.array(kept), fresh, rtol=1e-5, atol=1e-6)


def test_micro_batches_pack_rows_of_like_length_and_change_no_log_prob_or_gradient(tiny_folder, tmp_path):
    rng = np.random.default_rng(0)
    groups = [Group(row={}, prompt_ids=rng.integers(3, 60, p).tolist(),
                    completions=[rng.integers(3, 60, n).tolist() for n in lengths], texts=[""] * 3,
                    truncated=[False] * 3, rewards=np.zeros((3, 1)))
              for p, lengths in ((4, (2, 9, 5)), (7, (1, 3, 12)))]
    micro = micro_batches(groups, max_tokens=24)
    assert sorted(i for mb in micro for i in mb.rows.tolist()) == list(range(6))
    assert all(mb.inputs.size <= 24 or len(mb.rows) == 1 for mb in micro) and len(micro) > 1
    tr = _trainer(tiny_folder, tmp_path / "mb", beta=0.04)
    seqs = [(g.prompt_ids, c) for g in groups for c in g.completions]
    for mb in micro:  # each row's log-probs: those of a forward pass of that row alone
        logps, _ = tr.micro_logps(tr.model, mb)
        for b, i in enumerate(mb.rows.tolist()):
            prompt, completion = seqs[i]
            alone = tr.model(mx.array([prompt + completion[:-1]]))[0, len(prompt) - 1:]
            expected = np.array(completion_logps(alone, mx.array(completion)))[0]
            np.testing.assert_allclose(np.array(logps[b, : len(completion)]), expected, atol=1e-5)

    advantages = rng.normal(size=6).astype(np.float32)

    def grads(max_tokens):
        batch = RolloutBatch(groups, advantages, np.zeros((6, 1)), np.zeros(6), 0.0, 0, 0.0)
        tr.cfg.micro_batch_tokens = max_tokens
        tr.prepare(batch)
        return len(batch.micro), dict(tree_flatten(tr.compute_grads(batch)[0]))

    n_one, one = grads(1)  # every row alone
    n_all, together = grads(4096)
    assert (n_one, n_all) == (6, 1)
    for k in one:
        np.testing.assert_allclose(np.array(together[k]), np.array(one[k]), atol=1e-5)


def test_dora_and_full_finetuning_steps(tiny_folder, tmp_path):
    tr = _trainer(tiny_folder, tmp_path / "dora", finetune="dora", beta=0.04)
    kinds = {type(m) for _, m in tr.model.named_modules()}
    assert {lora.DoRALinear, lora.DoRASwitchLinear, lora.DoRAMultiLinear} <= kinds
    before = _params(tr.model)
    tr.train_step()
    after = _params(tr.model)
    assert any(k.endswith(".switch_mlp.gate_up_proj.m") and not np.array_equal(before[k], after[k]) for k in before)
    model, tok, _ = load_for_training(tiny_folder)
    ref, _, _ = load_for_training(tiny_folder)
    ref.freeze()
    cfg = GRPOConfig(**{**SMALL, "finetune": "full", "beta": 0.04})
    full = GRPOTrainer(model, tok, cfg, tmp_path / "full", progress=False, ref_model=ref)
    bias = [np.array(m.gate.e_score_correction_bias) for m in full.moe]
    ref_before = _params(ref)
    before = _params(model)
    full.train_step()
    after = _params(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before if ".mlp.switch_mlp." in k)
    assert all(np.array_equal(b, np.array(m.gate.e_score_correction_bias)) for b, m in zip(bias, full.moe))
    assert all(np.array_equal(v, np.array(dict(tree_flatten(ref.parameters()))[k])) for k, v in ref_before.items())
    with pytest.raises(ValueError, match="reference"):
        GRPOTrainer(load_for_training(tiny_folder)[0], tok, cfg, tmp_path / "x", progress=False)


def test_bias_update_moves_the_main_routers_only(tiny_folder, tmp_path):
    """With bias_gamma > 0 the rollouts' expert counts move the main model's biases; GRPO never runs the
    MTP module, whose bias stays put."""
    tr = _trainer(tiny_folder, tmp_path / "run", bias_gamma=0.01)
    assert len(tr.moe) == 2 and tr.moe[-1].layer >= tr.model.args.num_hidden_layers  # the MTP module's MoE
    before = [np.array(m.gate.e_score_correction_bias) for m in tr.moe]
    tr.train_step()
    after = [np.array(m.gate.e_score_correction_bias) for m in tr.moe]
    assert np.abs(after[0] - before[0]).max() > 0
    np.testing.assert_array_equal(after[1], before[1])


def test_resume_reproduces_the_next_step(tiny_folder, tmp_path):
    a = _trainer(tiny_folder, tmp_path / "a", mu=2, beta=0.04)
    a.run()
    b = _trainer(tiny_folder, tmp_path / "b", mu=2, beta=0.04)
    b.cfg.steps = 1
    b.run()
    shutil.rmtree(tmp_path / "b" / "model")
    shutil.rmtree(tmp_path / "b" / "adapters")
    b2 = _trainer(tiny_folder, tmp_path / "b", mu=2, beta=0.04)
    b2.run(resume=True)
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in mb] == [1, 2]
    for key in ("reward", "loss", "kl", "completion_length", "grad_norm"):
        assert ma[1][key] == pytest.approx(mb[1][key], rel=1e-5, abs=1e-7), key
    wa = mx.load(str(tmp_path / "a" / "adapters" / lora.ADAPTER_FILE))
    wb = mx.load(str(tmp_path / "b" / "adapters" / lora.ADAPTER_FILE))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-6)
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-0000002" / "trainer" / "state.json").read_text())
    assert state["step"] == 2 and state["data"]["position"] == 4


def test_zero_variance_groups_are_counted_and_resampled(tiny_folder, tmp_path, monkeypatch):
    tr = _trainer(tiny_folder, tmp_path / "z", rewards={"accuracy": 1.0}, resample_zero_std=2)
    calls = []
    orig = tr.reward_set.score

    def score(completions, examples):
        calls.append(len(completions))
        return orig(completions, examples)

    monkeypatch.setattr(tr.reward_set, "score", score)
    batch = tr.make_batch()
    assert isinstance(batch, RolloutBatch) and len(batch.groups) == 2
    # a random tiny model answers nothing right: every group has zero variance, so two more rounds were drawn
    assert batch.zero_std_frac == 1.0 and len(calls) == 6 and tr.data.position == 6  # 3 rounds x 2 groups
    assert np.all(batch.advantages == 0) and len(batch.drawn) == 18  # every rollout drawn is kept for the means


def test_the_difficulty_filter_skips_settled_buckets_and_resumes(tiny_folder, tmp_path, monkeypatch):
    f = DifficultyFilter(2)
    assert all(f.admits(r) for r in [{"bucket": "a"}, {"bucket": "a"}, {"bucket": "b"}, {}])
    f.record([{"bucket": "a"}, {"bucket": "a"}, {"bucket": "b"}], [True, True, False])
    assert f.agreeing == {"a": 2, "b": 0}
    assert [f.admits({"bucket": "a"}) for _ in range(4)] == [False, True, False, True]  # one probe in 2
    assert f.admits({"bucket": "b"}) and f.admits({}) and f.take_skipped() == 2 and f.take_skipped() == 0
    f.record([{"bucket": "a"}], [False])  # a probe whose rewards varied: the bucket comes back
    assert f.admits({"bucket": "a"}) and f.take_skipped() == 0
    with pytest.raises(ValueError, match="skip_settled=1"):
        GRPOConfig(skip_settled=1).check()
    # in the trainer: every group's rewards agree, the one bucket (add1) settles, half its prompts are skipped
    opts = {"levels": (1, 1), "kinds": ("add",)}
    tr = _trainer(tiny_folder, tmp_path / "f", rewards={"accuracy": 1.0}, skip_settled=2, steps=3, task_options=opts)
    monkeypatch.setattr(tr.reward_set, "score", lambda completions, examples: np.zeros((len(completions), 1)))
    tr.run()
    assert [r["skipped"] for r in read_metrics(tmp_path / "f")] == [0, 2, 2] and tr.data.position == 10
    state = json.loads((tmp_path / "f" / "checkpoints" / "step-0000003" / "trainer" / "state.json").read_text())
    assert state["difficulty"] == tr.filter.state() and state["difficulty"]["agreeing"] == {"add1": 6}
    again = _trainer(tiny_folder, tmp_path / "f", rewards={"accuracy": 1.0}, skip_settled=2, task_options=opts)
    assert again.resume() and again.filter.state() == tr.filter.state() and again.data.position == 10


def test_prompts_beyond_the_sft_levels(tiny_folder, tmp_path, monkeypatch):
    """--beyond: train-side prompts at the hard split's levels (the problems the hard split evaluates are never
    among them); --beyond SHARE: that share of them, the rest at the training levels. It reaches the stream as a
    task option."""
    stream = PromptStream("arithmetic", None, "train", 3, {"beyond": True})
    assert [r["prompt"] for r in stream.take(5)] == [tasks.example_at(i, "train", 3, beyond=True).prompt for i in range(5)]
    mixed = PromptStream("arithmetic", None, "train", 3, {"beyond": 0.5}).take(200)
    far = [tasks.example_at(i, "train", 3, beyond=True).prompt for i in range(200)]
    near = [tasks.example_at(i, "train", 3).prompt for i in range(200)]
    went = [r["prompt"] == f for r, f in zip(mixed, far)]
    assert all(w or r["prompt"] == n for r, n, w in zip(mixed, near, went))
    assert 0.35 < np.mean(went) < 0.65
    # every kind is drawn both ways (the share's coin is not tied to the kind's draw)
    kinds = {r["kind"] for r in mixed}
    assert len(kinds) == 6 and {(r["kind"], w) for r, w in zip(mixed, went)} == {(k, w) for k in kinds for w in (1, 0)}
    seen = {}

    def fake_grpo(model, out, cfg, resume=False, progress=True):
        seen["options"] = cfg.task_options
        return tmp_path / "model"

    monkeypatch.setattr("mlx_deepseek.train.grpo.grpo", fake_grpo)
    assert main(["train", "grpo", "--out", str(tmp_path / "run"), "--beyond", "--no-progress"]) == 0
    assert seen["options"] == {"beyond": 1.0}
    assert main(["train", "grpo", "--out", str(tmp_path / "run2"), "--beyond", "0.75", "--no-progress"]) == 0
    assert seen["options"] == {"beyond": 0.75}
    with pytest.raises(SystemExit, match="--beyond 1.5"):
        main(["train", "grpo", "--out", str(tmp_path / "run3"), "--beyond", "1.5", "--no-progress"])
    with pytest.raises(ValueError, match="beyond with split='hard'"):
        GRPOConfig(split="hard", task_options={"beyond": 0.5}).check()
    # --kinds: the prompt mix, a kind repeated drawn that much more often (here count: 2 of 3, beyond or not)
    assert main(["train", "grpo", "--out", str(tmp_path / "run4"), "--kinds", "add", "count", "count", "--beyond",
                 "0.5", "--no-progress"]) == 0
    assert seen["options"] == {"kinds": ("add", "count", "count"), "beyond": 0.5}
    rows = PromptStream("arithmetic", None, "train", 3, seen["options"]).take(300)
    counts = [r["kind"].startswith("count") for r in rows]
    assert {r["kind"] for r in rows} == {"add", "count_items", "count_letter"} and 0.58 < np.mean(counts) < 0.75


def test_train_grpo_command_with_a_raising_reward_and_fuse(tiny_folder, tmp_path):
    rewards = tmp_path / "mine.py"
    rewards.write_text("def flaky(completion, example):\n    raise ValueError('always')\n")
    out = tmp_path / "run"
    assert main(["train", "grpo", "--model", str(tiny_folder), "--task", "arithmetic", "--out", str(out),
                 "--steps", "2", "--prompts", "2", "--group-size", "2", "--max-completion-tokens", "5",
                 "--reward-file", str(rewards), "--reward", "accuracy=1", "--reward", "flaky=0.5",
                 "--eval-every", "2", "--eval-n", "2", "--levels", "1", "1", "--no-progress"]) == 0
    rows = read_metrics(out)
    assert rows[0]["step"] == 0 and "eval_accuracy" in rows[0]
    assert rows[-1]["reward_errors"] == {"flaky": 8} and "eval_accuracy" in rows[-1]
    assert (out / "model" / "config.json").exists() and (out / "adapters" / lora.ADAPTER_FILE).exists()
    fused = tmp_path / "fused"
    assert main(["fuse", "--model", str(tiny_folder), "--adapters", str(out / "adapters"), "--out", str(fused)]) == 0
    from mlx_deepseek import load_model

    x = mx.array([[1, 5, 9, 12]])
    np.testing.assert_allclose(np.array(load_model(fused)(x)), np.array(load_model(out / "model")(x)), atol=1e-4)
    assert main(["train", "grpo", "--model", str(tiny_folder), "--out", str(out), "--steps", "3",
                 "--no-progress"]) == 2  # checkpoints there and no --resume


def test_rejection_sampling_keeps_the_correct_samples_and_distill_trains_on_them(tiny_folder, tmp_path, monkeypatch):
    from mlx_deepseek.generate import GenerationResult
    from mlx_deepseek.train import distill

    def fake_generate(model, tok, texts, n=1, **kw):  # per prompt: right, right again, wrong, unfinished, no format
        out = []
        for t in texts:
            answer = "7" if "3 + 4" in t else "?"
            out += [GenerationResult(text=f"add\n</think>\n\n\\boxed{{{answer}}}", finish_reason="stop"),
                    GenerationResult(text=f"add\n</think>\n\n\\boxed{{{answer}}}", finish_reason="stop"),
                    GenerationResult(text="add\n</think>\n\n\\boxed{8}", finish_reason="stop"),
                    GenerationResult(text=f"add\n</think>\n\n\\boxed{{{answer}}}", finish_reason="length"),
                    GenerationResult(text=f"\\boxed{{{answer}}}", finish_reason="stop")][:n]
        return out

    monkeypatch.setattr(distill, "batch_generate", fake_generate)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "What is 3 + 4?", "answer": "7", "lang": "en"}) + "\n"
                    + json.dumps({"prompt": "What is 1 + 1?", "answer": "2", "lang": "en"}) + "\n")
    out = tmp_path / "sft.jsonl"
    assert main(["train", "rejection-sample", "--model", str(tiny_folder), "--data", str(data), "--out", str(out),
                 "--prompts", "4", "--samples", "5", "--keep-per-prompt", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # two epochs over the file: the 3 + 4 prompt twice, one distinct correct sample each time
    assert len(rows) == 2 and all(r["prompt"] == "What is 3 + 4?" for r in rows)
    assert rows[0]["completion"].startswith("<think>\nadd\n</think>") and rows[0]["completion"].endswith("<｜end▁of▁sentence｜>")
    model = distill.sft_on_jsonl(tiny_folder, out, tmp_path / "student",
                                 distill.sft_config(steps=2, batch_size=2, seq_len=32, eval_every=0, log_every=1, compile=False),
                                 progress=False)
    assert (model / "config.json").exists() and len(read_metrics(tmp_path / "student")) == 2


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_stacked_adapters_compute_what_they_fuse_to(dora, quantized):
    """Expert stacks and MLA's per-head W_UK / W_UV get LoRA or DoRA; an adapter starts as its base, and its
    output equals that of the layer `fuse` makes (transposed and untransposed for the per-head layer)."""
    mx.random.seed(0)
    experts, heads = SwitchLinear(64, 32, 4), MultiLinear(64, 32, 2)
    if quantized:
        experts, heads = experts.to_quantized(group_size=32, bits=8), heads.to_quantized(group_size=32, bits=8)
    s = lora.LoraSettings(rank=4, scale=2.0, dora=dora)
    x, idx = mx.random.normal((3, 1, 1, 64)), mx.array([[0, 2], [3, 3], [1, 0]])
    for base, call in ((experts, lambda m: m(x, idx)), (heads, lambda m: m(x[:, None, 0])),
                       (heads, lambda m: m(mx.random.normal((3, 1, 5, 32), key=mx.random.key(1)), transpose=False))):
        adapter = lora._adapter_for(base, s)
        assert type(adapter).__name__.startswith("DoRA" if dora else "LoRA")
        np.testing.assert_allclose(np.array(call(adapter)), np.array(call(base)), atol=1e-4)  # B = 0: the base
        adapter.lora_b = mx.random.normal(adapter.lora_b.shape) * 0.1
        if dora:
            adapter.m = adapter.m * 1.5
        out = np.array(call(adapter))
        assert np.abs(out - np.array(call(base))).max() > 1e-2
        np.testing.assert_allclose(np.array(call(adapter.fuse(dequantize=True))), out, atol=1e-4)
        assert ("scales" in adapter.fuse()) == quantized  # re-quantized like the base
        holder = nn.Module()
        holder.layer = adapter
        with lora.adapters_merged(holder):  # rollouts: float bases merged, quantized ones keep their adapter
            assert (holder.layer is adapter) == quantized
            np.testing.assert_allclose(np.array(call(holder.layer)), out, atol=1e-4)
        assert holder.layer is adapter
