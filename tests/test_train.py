"""Training: loss falls, MTP and balance losses, the aux-loss-free bias update, SFT masking, checkpoints and
resume (the same next step as an uninterrupted run), the `train` commands."""

import json
import shutil
from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_deepseek import load, load_model
from mlx_deepseek.cli import main
from mlx_deepseek.config import ModelArgs
from mlx_deepseek.models import Model
from mlx_deepseek.train import balance, lora, tasks
from mlx_deepseek.train.data import PackedBatches, encode_example
from mlx_deepseek.train.loop import TrainConfig, Trainer, init_weights, masked_cross_entropy, read_metrics
from mlx_deepseek.train.pretrain import NANO_CONFIG, pretrain
from mlx_deepseek.train.sft import sft, sft_config
from mlx_deepseek.tokenizer import load_tokenizer

TINY = {
    "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
    "moe_intermediate_size": 16, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 2,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
    "routed_scaling_factor": 1.0, "num_nextn_predict_layers": 1,
}
FAST = dict(batch_size=4, seq_len=48, warmup=2, log_every=1, eval_every=0, compile=False)



def tiny_model(seed=0, **changes):
    model = Model(ModelArgs.from_dict({**TINY, **changes}))
    init_weights(model, seed)
    return model


def params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_nano_config_is_a_v3_model():
    args = ModelArgs.from_file(NANO_CONFIG)
    assert args.model_type == "deepseek_v3" and args.uses_mla and args.q_lora_rank
    assert args.topk_method == "noaux_tc" and args.scoring_func == "sigmoid" and args.n_group > 1
    assert args.num_nextn_predict_layers == 1 and args.n_shared_experts == 1
    assert not args.is_moe_layer(0) and all(args.is_moe_layer(i) for i in range(1, args.num_hidden_layers))


def test_the_mtp_loss_is_the_mean_over_d_sequential_modules(tok, tmp_path):
    """V3's L_MTP with D = 2: module k sees module k-1's hidden states (the main model's for k = 0) and
    t_{i+k+1} and predicts t_{i+k+2}; the MTP loss is the mean of the modules' cross-entropies."""
    model = tiny_model(num_nextn_predict_layers=2)
    trainer = Trainer(model, tok, TrainConfig(steps=1, **FAST), tmp_path, progress=False)
    ids, mask = map(mx.array, next(PackedBatches(tok, 2, 32, "heldout", seed=1)))
    total, ce, mtp_ce, aux, _ = trainer.loss(model, ids, mask)
    inputs, targets, tmask = ids[:, :-1], ids[:, 1:], mask[:, 1:].astype(mx.float32)
    h, ces = model.model(inputs), []
    for k in range(2):
        h, logits = model.mtp_step(h[:, : inputs.shape[1] - k - 1], inputs[:, k + 1 :], k)
        losses = nn.losses.cross_entropy(logits, targets[:, k + 1 :])
        ces.append(((losses * tmask[:, k + 1 :]).sum() / tmask[:, k + 1 :].sum()).item())
    assert mtp_ce.item() == pytest.approx(sum(ces) / 2, rel=1e-5) and ces[0] != pytest.approx(ces[1])
    assert total.item() == pytest.approx(ce.item() + trainer.cfg.mtp_weight * mtp_ce.item() + aux.item(), rel=1e-5)
    # a step trains both modules
    before = params(model)
    trainer.train_step(*next(trainer.data))
    after = params(model)
    for k in range(2):
        assert any(not np.array_equal(before[n], after[n]) for n in before if n.startswith(f"mtp.{k}.eh_proj"))


def test_a_few_steps_lower_the_loss(tok, tmp_path):
    trainer = Trainer(tiny_model(), tok, TrainConfig(steps=25, lr=1e-2, **FAST), tmp_path, progress=False)
    fixed = next(PackedBatches(tok, 4, 48, "heldout", seed=1))
    before = trainer.loss(trainer.model, *map(mx.array, fixed))
    losses = [trainer.train_step(*next(trainer.data)) for _ in range(25)]
    after = trainer.loss(trainer.model, *map(mx.array, fixed))
    assert after[1].item() < before[1].item() - 1.0  # main CE on unseen data
    assert after[2].item() < before[2].item() - 1.0  # MTP CE
    assert np.mean([r["ce"] for r in losses[-5:]]) < np.mean([r["ce"] for r in losses[:5]])


def test_mtp_loss_predicts_two_ahead(tok):
    model = tiny_model()
    cfg = TrainConfig(steps=1, mtp_weight=0.5, **FAST)
    trainer = Trainer(model, tok, cfg, "/tmp/unused", progress=False)
    ids, mask = map(mx.array, next(trainer.data))
    total, ce, mtp_ce, aux, _ = trainer.loss(model, ids, mask)
    hidden = model.model(ids[:, :-1])
    expect = nn.losses.cross_entropy(model.mtp_step(hidden[:, :-1], ids[:, 1:-1])[1], ids[:, 2:]).mean()
    assert abs(mtp_ce.item() - expect.item()) < 1e-5
    assert abs(total.item() - (ce.item() + 0.5 * mtp_ce.item() + aux.item())) < 1e-5


def test_bias_is_frozen_and_moved_only_by_the_update(tok, tmp_path):
    model = tiny_model()
    trainer = Trainer(model, tok, TrainConfig(steps=3, bias_gamma=0.01, **FAST), tmp_path, progress=False)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert not [k for k in trainable if "e_score_correction_bias" in k]
    biases = [m.gate.e_score_correction_bias for m in balance.moe_layers(model)]
    assert len(biases) == 2  # the MoE layer and the MTP module's
    r = trainer.train_step(*next(trainer.data))
    for b, m, c, positions in zip(biases, balance.moe_layers(model), r["counts"], (48, 47)):
        expect = np.array(b) + 0.01 * np.sign(c.mean() - c)
        np.testing.assert_allclose(np.array(m.gate.e_score_correction_bias), expect, atol=1e-7)
        assert c.sum() == 4 * positions * 2  # every token picks top-2 (MTP: one position fewer)


def test_bias_update_moves_a_skewed_router_toward_balance():
    model = tiny_model(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)
    gate = model.layers[0].mlp.gate
    x = mx.random.normal((512, 32), key=mx.random.key(1)) + 0.3  # inputs share a direction
    w = 0.2 * np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    w[:2] += 0.15  # experts 0 and 1 lean into it: they win most tokens
    gate.weight = mx.array(w)

    def ratio():
        inds, _ = gate(x)
        counts = balance.one_hot_selection(inds, 8).sum(axis=0)
        return counts, balance.load_ratio(counts[None])[0]

    counts, start = ratio()
    assert start > 2.5
    for _ in range(40):
        balance.update_bias(model, counts[None], gamma=0.01)
        counts, r = ratio()
    assert r < 1.2
    # gate weights stay the unbiased scores of the chosen experts (renormalised)
    inds, weights = gate(x)
    s = mx.sigmoid(x @ gate.weight.T)
    chosen = mx.take_along_axis(s, inds, axis=-1)
    np.testing.assert_allclose(np.array(weights), np.array(chosen / chosen.sum(-1, keepdims=True)), atol=1e-5)


def test_balance_losses_match_the_papers_formulas():
    rng = np.random.default_rng(0)
    b, t, e, k = 2, 6, 4, 2
    s = rng.random((b, t, e)).astype(np.float32)
    s /= s.sum(-1, keepdims=True)
    inds = np.argsort(-s, axis=-1)[..., :k]
    sel = np.zeros((b, t, e))
    np.put_along_axis(sel, inds, 1, axis=-1)
    f = e / (k * t) * sel.sum(1)
    seq = np.mean((f * s.mean(1)).sum(-1))
    fb = e / (k * b * t) * sel.reshape(-1, e).sum(0)
    pb = s.reshape(-1, e).mean(0)
    dev = (fb.reshape(2, 2).mean(-1) * pb.reshape(2, 2).sum(-1)).sum()
    S, I = mx.array(s), mx.array(inds)
    assert abs(balance.sequence_balance_loss(S, I, k).item() - seq) < 1e-5
    assert abs(balance.expert_balance_loss(S, I, k).item() - (fb * pb).sum()) < 1e-5
    assert abs(balance.device_balance_loss(S, I, k, 2).item() - dev) < 1e-5
    uniform = mx.full((1, 4, 4), 0.25)
    assert abs(balance.sequence_balance_loss(uniform, mx.array([[[0, 1], [2, 3], [0, 1], [2, 3]]]), 2).item() - 1.0) < 1e-6


def test_bias_update_without_the_mtp_loss_leaves_the_mtp_router_alone(tok, tmp_path):
    """With lambda = 0 the MTP module does not run: its expert counts are zero and its bias stays put."""
    model = tiny_model()
    trainer = Trainer(model, tok, TrainConfig(steps=1, mtp_weight=0.0, bias_gamma=0.01, **FAST), tmp_path,
                      progress=False)
    main, mtp = balance.moe_layers(model)
    before = np.array(main.gate.e_score_correction_bias), np.array(mtp.gate.e_score_correction_bias)
    counts = trainer.train_step(*next(trainer.data))["counts"]
    assert counts[0].sum() == 4 * 48 * 2 and counts[1].sum() == 0
    assert np.abs(np.array(main.gate.e_score_correction_bias) - before[0]).max() > 0
    np.testing.assert_array_equal(np.array(mtp.gate.e_score_correction_bias), before[1])


def test_balance_losses_train_the_router(tok, tmp_path):
    model = tiny_model()
    cfg = TrainConfig(steps=1, mtp_weight=0.0, seq_aux_alpha=1.0, expert_aux_alpha=1.0, device_aux_alpha=1.0,
                      n_devices=2, **FAST)
    trainer = Trainer(model, tok, cfg, tmp_path, progress=False)
    ids, mask = map(mx.array, next(trainer.data))
    grad = nn.value_and_grad(model, lambda m, i, k: trainer.loss(m, i, k)[3])(model, ids, mask)[1]
    g = np.array(grad["model"]["layers"][1]["mlp"]["gate"]["weight"])
    assert np.abs(g).max() > 0
    assert trainer.loss(model, ids, mask)[3].item() > 0


def test_sft_masks_the_prompt(tok):
    ex = tasks.example_at(0)
    ids, mask = encode_example(tok, ex, mask_prompt=True)
    n_prompt = len(tok.encode(ex.prompt_text))
    assert ids == tok.encode(ex.text)
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tok.decode(ids[n_prompt:]) == ex.completion
    batch_ids, batch_mask = next(PackedBatches(tok, 2, 64, mask_prompt=True))
    assert 0 < batch_mask.mean() < 1
    # masked targets do not count: changing them leaves the loss as it is
    logits = mx.random.normal((2, 64, 512))
    targets, m = mx.array(batch_ids[:, 1:]), mx.array(batch_mask[:, 1:])
    other = mx.where(m == 0, (targets + 1) % 512, targets)
    assert masked_cross_entropy(logits, targets, m).item() == masked_cross_entropy(logits, other, m).item()


def test_pretraining_share_beyond_the_training_levels(tok):
    """--beyond P: about that share of the packed examples are drawn at the hard levels, the rest as usual."""
    mixed = PackedBatches(tok, 1, 40, beyond=0.25)
    far = [mixed.example(i).problem.level > tasks.TRAIN_LEVELS[tasks._family(mixed.example(i).problem.kind)][1]
           for i in range(400)]
    assert 0.18 < sum(far) / 400 < 0.32
    # every kind goes beyond, not only those whose draw happens to correlate with the share's coin
    kinds = Counter(tasks._family(e.problem.kind) for e in map(mixed.example, range(2000))
                    if e.problem.level > tasks.TRAIN_LEVELS[tasks._family(e.problem.kind)][1])
    assert set(kinds) == {"add", "sub", "mul", "cmp", "count"} and min(kinds.values()) > 0.1 * sum(kinds.values())
    plain = PackedBatches(tok, 1, 40)
    assert not any(plain.example(i).problem.level > 5 for i in range(100))
    with pytest.raises(ValueError, match="beyond=1.5"):
        TrainConfig(beyond=1.5).check()


def test_packing_is_resumable(tok):
    a = PackedBatches(tok, 2, 40)
    next(a)
    state = a.state()
    expect = next(a)
    b = PackedBatches(tok, 2, 40, state=json.loads(json.dumps(state)))
    got = next(b)
    assert (got[0] == expect[0]).all() and (got[1] == expect[1]).all()


@pytest.mark.parametrize("compiled", [False, True])
def test_resume_gives_the_same_next_step(tok, tok_dir, tmp_path, compiled):
    cfg = dict(steps=6, lr=1e-2, bias_gamma=0.01, **{**FAST, "compile": compiled})
    straight = Trainer(tiny_model(), tok, TrainConfig(**cfg), tmp_path / "a", progress=False)
    third = [straight.train_step(*next(straight.data)) for _ in range(3)][-1]
    interrupted = Trainer(tiny_model(), tok, TrainConfig(**cfg), tmp_path / "b", progress=False, tokenizer_dir=tok_dir)
    for _ in range(2):
        interrupted.train_step(*next(interrupted.data))
    ckpt = interrupted.save_checkpoint()
    del interrupted
    assert load_model(ckpt) is not None  # a checkpoint is a model folder
    resumed = Trainer(tiny_model(seed=99), tok, TrainConfig(**cfg), tmp_path / "b", progress=False)
    assert resumed.resume() and resumed.step == 2
    r = resumed.train_step(*next(resumed.data))
    a, b = params(straight.model), params(resumed.model)
    assert a.keys() == b.keys()
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
    assert float(straight.optimizer.learning_rate.item()) == float(resumed.optimizer.learning_rate.item())
    assert abs(r["loss"] - third["loss"]) <= 1e-6 and (r["counts"] == third["counts"]).all()


def test_pretrain_then_resume_then_sft(tok_dir, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(steps=3, save_every=2, **{**FAST, "log_every": 2})
    model_dir = pretrain(out, cfg, config=TINY, tokenizer=tok_dir, progress=False)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [2, 3]
    assert len(rows[0]["load_max_mean"]) == 2 and rows[0]["tokens_per_s"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    assert (model_dir / "mtp.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    model, tok = load(model_dir)
    assert model.args.vocab_size == tok.vocab_size == 512
    with pytest.raises(ValueError, match="resume"):
        pretrain(out, cfg, config=TINY, tokenizer=tok_dir, progress=False)
    pretrain(out, TrainConfig(steps=5, save_every=2, **{**FAST, "log_every": 2}), config=TINY, tokenizer=tok_dir,
             resume=True, progress=False)
    assert [r["step"] for r in read_metrics(out)] == [2, 3, 4, 5]
    sft_out = sft(model_dir, tmp_path / "sft", sft_config(steps=2, **FAST), progress=False)
    assert load(sft_out)[0].args.vocab_size == 512
    # from a quantized checkpoint (the bundled nano-r1 is one): trained on its dequantized weights, saved as floats
    assert main(["convert", str(model_dir), "-o", str(tmp_path / "q8"), "-q", "--q-bits", "8", "--q-group-size", "32",
                 "--no-progress"]) == 0
    q_out = sft(tmp_path / "q8", tmp_path / "sft-q8", sft_config(steps=1, **FAST), progress=False)
    assert load(q_out)[0].args.quantization is None
    # a second MTP module trained onto the finished model: it starts as the first; nothing else moves
    deep_out = sft(sft_out, tmp_path / "deep", sft_config(steps=2, **FAST), progress=False, grow_mtp=2)
    before, after = params(load(sft_out)[0]), params(load(deep_out)[0])
    assert load(deep_out)[0].args.num_nextn_predict_layers == 2
    assert all(np.array_equal(before[n], after[n]) for n in before)  # main model, module 0, router biases
    grown = [n for n in after if n.startswith("mtp.1.")]
    assert any(not np.array_equal(after[n], before["mtp.0." + n[6:]]) for n in grown)
    with pytest.raises(ValueError, match="must exceed"):
        sft(deep_out, tmp_path / "again", sft_config(steps=1, **FAST), progress=False, grow_mtp=2)


def test_pretraining_continues_from_a_model(tok_dir, tmp_path):
    """train pretrain --init M: the run starts from M's weights (with its config and tokenizer), not a fresh init."""
    base = pretrain(tmp_path / "pre", TrainConfig(steps=1, **FAST), config=TINY, tokenizer=tok_dir, progress=False)
    flags = ["--steps", "1", "--batch", "4", "--seq-len", "48", "--warmup", "1", "--log-every", "1", "--eval-every",
             "0", "--bias-gamma", "0", "--no-compile", "--no-progress", "--init", str(base)]
    assert main(["train", "pretrain", "--out", str(tmp_path / "still"), "--lr", "1e-12"] + flags) == 0
    assert main(["train", "pretrain", "--out", str(tmp_path / "moved"), "--lr", "1e-2"] + flags) == 0
    before = params(load(base)[0])
    still, moved = params(load(tmp_path / "still" / "model")[0]), params(load(tmp_path / "moved" / "model")[0])
    assert max(np.abs(before[k] - still[k]).max() for k in before) <= 1e-6  # a random init would be far away
    assert max(np.abs(before[k] - moved[k]).max() for k in before) > 1e-4
    assert (tmp_path / "still" / "model" / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="brings its config"):
        pretrain(tmp_path / "x", TrainConfig(steps=1, **FAST), config=TINY, init=base, progress=False)


def test_sft_with_lora_adapters_and_resume(tok_dir, tmp_path):
    """train sft --finetune lora: only adapters train (the MTP modules and router biases stay), checkpoints hold the
    adapters and resume from them, out/model is the base with the adapters fused in, out/adapters fuses onto it."""
    base = pretrain(tmp_path / "pre", TrainConfig(steps=1, **FAST), config=TINY, tokenizer=tok_dir, progress=False)
    args = ["train", "sft", "--model", str(base), "--steps", "2", "--batch", "4", "--seq-len", "48", "--warmup", "1",
            "--log-every", "1", "--eval-every", "0", "--save-every", "1", "--no-compile", "--no-progress",
            "--finetune", "lora", "--lora-rank", "4"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    before, after = params(load(base)[0]), params(load(tmp_path / "a" / "model")[0])
    assert set(before) == set(after)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed and all(n.startswith("model.layers.") for n in changed)  # MTP modules, embeddings, biases kept
    assert not any("e_score_correction_bias" in n for n in changed)
    assert (tmp_path / "a" / "checkpoints" / "step-0000001" / lora.ADAPTER_FILE).exists()
    fused = tmp_path / "fused"
    assert main(["fuse", "--model", str(base), "--adapters", str(tmp_path / "a" / "adapters"), "--out", str(fused)]) == 0
    np.testing.assert_allclose(params(load(fused)[0])["model.layers.0.self_attn.o_proj.weight"],
                               after["model.layers.0.self_attn.o_proj.weight"], atol=1e-6)
    # a run cut after step 1 and resumed from its step-1 adapters ends where the straight one did
    for gone in ("model", "adapters", "checkpoints/step-0000002"):
        shutil.rmtree(tmp_path / "a" / gone)
    assert main(args + ["--out", str(tmp_path / "a"), "--resume"]) == 0
    resumed = params(load(tmp_path / "a" / "model")[0])
    assert all(np.allclose(resumed[n], after[n], atol=1e-6) for n in after)


def test_train_commands(tok_dir, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    assert main(["train", "tokenizer", "--out", str(tmp_path / "tok"), "--vocab-size", "448", "--texts", "500"]) == 0
    assert load_tokenizer(tmp_path / "tok").vocab_size == 448
    args = ["--steps", "2", "--batch", "2", "--seq-len", "32", "--no-progress", "--no-compile", "--eval-every", "1"]
    out = tmp_path / "pre"
    assert main(["train", "pretrain", "--out", str(out), "--config", str(config), "--tokenizer", str(tok_dir),
                 "--mtp-weight", "0.1", "--bias-gamma", "0.01", "--seq-aux-alpha", "1e-4", *args]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["mtp_weight"] == 0.1 and saved["seq_aux_alpha"] == 1e-4 and saved["batch_size"] == 2
    assert "eval_ce" in read_metrics(out)[-1]
    assert main(["train", "pretrain", "--out", str(out), "--config", str(config), *args]) == 2  # would clobber
    assert main(["train", "sft", "--model", str(out / "model"), "--out", str(tmp_path / "sft"), *args]) == 0
    assert json.loads((tmp_path / "sft" / "train_config.json").read_text())["mask_prompt"] is True
