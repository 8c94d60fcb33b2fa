"""Distributed inference and training on two local ranks (ring backend over 127.0.0.1, started by
mlx.launch): expert-parallel and pipeline-parallel logits and greedy tokens equal one process's; each rank
reads only its part of the checkpoint; one data-parallel training step (pretraining, and GRPO on fixed
rollouts) equals the single-process step on the concatenated batch; GRPO ranks roll out their own prompts, only
rank 0 writes, resume continues the run. The ranks run tests/distributed_worker.py once for all checks (one launch)."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, write_tokenizer
from distributed_worker import GRPO_CASES, GRPO_RUN, filter_steps, grpo_step
from mlx.utils import tree_flatten

from mlx_deepseek import load_model
from mlx_deepseek.bench import random_checkpoint
from mlx_deepseek.config import ModelArgs
from mlx_deepseek.generate import generate_tokens
from mlx_deepseek.models import Model
from mlx_deepseek.parallel import split
from mlx_deepseek.cli import main
from mlx_deepseek.parallel.launch import launch_command, rank_command, run_ranks
from mlx_deepseek.train.data import PackedBatches
from mlx_deepseek.train.grpo import PromptStream
from mlx_deepseek.train.lora import ADAPTER_FILE
from mlx_deepseek.train.loop import TrainConfig, Trainer, init_weights, read_metrics
from mlx_deepseek.train.vocab import copy_tokenizer
from mlx_deepseek.weights import read_header, save_model, weight_files

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
PROMPT = [[1, 5, 6, 7, 8, 9, 10, 11], [3, 4, 5, 6, 100, 101, 102, 103]]
TINY = {  # as test_train's
    "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
    "moe_intermediate_size": 16, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 2,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
    "routed_scaling_factor": 1.0, "num_nextn_predict_layers": 1,
}
TRAIN = dict(steps=10, batch_size=4, seq_len=48, lr=1e-2, warmup=2, bias_gamma=0.01, mask_prompt=True,
             log_every=1, eval_every=0, compile=True)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Hugging Face layout (V3 with group routing and MTP, V2-Lite), MLX layout in float32 (stacked experts)
    and 4-bit (the V2-Lite shape, narrowed)."""
    root = tmp_path_factory.mktemp("ckpt")
    mlx_v3 = root / "mlx-v3"
    model = load_model(FIXTURES / "deepseek_v3", dtype="float32")
    save_model(model, mlx_v3, model.args.to_dict())
    return {
        "hf-v3": FIXTURES / "deepseek_v3",
        "hf-v2-lite": FIXTURES / "deepseek_v2_lite",
        "mlx-v3": mlx_v3,
        "mlx-q4": random_checkpoint(root / "mlx-q4", layers=3, scale=1 / 32, bits=4),
    }


@pytest.fixture(scope="module")
def dp_batch(tmp_path_factory, tok_dir, tok):
    """A batch with prompt-masked rows (the ranks' halves hold different numbers of loss tokens)."""
    path = tmp_path_factory.mktemp("dp") / "batch.npz"
    ids, mask = next(PackedBatches(tok, 4, 48, mask_prompt=True))
    assert mask[:2, 1:].sum() != mask[2:, 1:].sum()
    config = json.dumps({"model": TINY, "train": TRAIN})
    np.savez(path, ids=ids, mask=mask, config=np.array(config))
    return path, ids, mask


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The V3 fixture with a word-level tokenizer ('w5' is token 5)."""
    folder = tmp_path_factory.mktemp("chat") / "v3"
    shutil.copytree(FIXTURES / "deepseek_v3", folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def grpo_model(tmp_path_factory, tok_dir):
    """The tiny model (TINY, initialised with seed 0) as a folder with the task tokenizer."""
    folder = tmp_path_factory.mktemp("grpo") / "tiny"
    model = Model(ModelArgs.from_dict(TINY))
    init_weights(model, 0)
    save_model(model, folder, model.args.to_dict())
    copy_tokenizer(tok_dir, folder)
    return folder


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("grpo-runs")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, checkpoints, dp_batch, tok_dir, chat_model, grpo_model, grpo_runs):
    """Both ranks' results of every job (one mlx.launch run)."""
    out = tmp_path_factory.mktemp("ranks")
    jobs = [f"logits:{mode}:{path}" for path in checkpoints.values() for mode in ("ep", "pp")]
    jobs += [f"cli:{mode}:{chat_model}" for mode in ("ep", "pp")]
    jobs.append(f"dp:{tok_dir}:{dp_batch[0]}")
    jobs.append(f"grpo:{grpo_model}:{grpo_runs}")
    run_ranks([sys.executable, str(WORKER), str(out), *jobs], ranks=2, backend="ring", timeout=300, env=env())
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]


def reference(folder: Path):
    model = load_model(folder, dtype=None if "q4" in str(folder) else "float32")
    logits = np.array(model(mx.array(PROMPT)).astype(mx.float32))
    tokens = [t for new in generate_tokens(model, PROMPT[0], max_tokens=10) for t in new]
    return logits, tokens


@pytest.mark.parametrize("mode", ["ep", "pp"])
def test_logits_and_greedy_tokens_equal_one_process(ranks, checkpoints, mode):
    for name, path in checkpoints.items():
        logits, tokens = reference(path)
        for r in range(2):
            assert int(ranks[r]["size"]) == 2
            key = f"{mode}:{path}"
            err = np.abs(ranks[r][f"{key}/logits"] - logits).max()
            assert err <= 1e-5, (name, mode, r, err)
            assert ranks[r][f"{key}/tokens"].tolist() == tokens, (name, mode, r)  # prefill + compiled decode


def expected_bytes(folder: Path, mode: str, rank: int) -> int:
    """The tensor bytes rank `rank` of 2 needs, from the safetensors headers: PP its layers and the
    layer-less tensors; EP everything but the other rank's experts; neither the MTP layer."""
    args = ModelArgs.from_file(folder)
    layers, experts = split(args.num_hidden_layers, rank, 2), split(args.n_routed_experts, rank, 2)
    total = 0
    for f in weight_files(folder):
        for name, info in read_header(f).items():
            lo, hi = info["data_offsets"]
            layer = re.match(r"model\.layers\.(\d+)\.", name)
            if layer and int(layer.group(1)) >= args.num_hidden_layers:
                continue
            if mode == "pp":
                total += (hi - lo) if layer is None or int(layer.group(1)) in layers else 0
            elif (e := re.search(r"\.experts\.(\d+)\.", name)) is not None:
                total += (hi - lo) if int(e.group(1)) in experts else 0
            else:
                total += (hi - lo) * len(experts) // args.n_routed_experts if ".switch_mlp." in name else hi - lo
    return total


def test_each_rank_reads_only_its_part(ranks, checkpoints):
    """PP: a rank reads its layers (and the embedding, final norm and head); EP: its experts' rows of each
    stacked tensor (or its per-expert tensors) and the rest. The bytes the process read through read()
    calls (/proc/self/io rchar, page cache included) match, plus headers and config files."""
    for name, path in checkpoints.items():
        for mode in ("ep", "pp"):
            key = f"{mode}:{path}"
            total = int(ranks[0][f"{key}/bytes_total"])
            for r in range(2):
                read, rchar = int(ranks[r][f"{key}/bytes_read"]), int(ranks[r][f"{key}/rchar"])
                assert read == expected_bytes(path, mode, r) < total, (name, mode, r, read, total)
                assert read <= rchar < read + 100_000, (name, mode, r, rchar, read)


def test_data_parallel_step_equals_single_process_step(ranks, dp_batch, tok):
    path, ids, mask = dp_batch
    model = Model(ModelArgs.from_dict(TINY))
    init_weights(model, 0)
    trainer = Trainer(model, tok, TrainConfig(**TRAIN), "/tmp/unused", progress=False)
    r = trainer.train_step(ids, mask)
    single = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for rank in ranks:
        assert abs(float(rank["dp/loss"]) - r["loss"]) < 1e-5 and abs(float(rank["dp/ce"]) - r["ce"]) < 1e-5
        assert abs(float(rank["dp/grad_norm"]) - r["grad_norm"]) < 1e-5
        worst = max(np.abs(rank[f"dp/param/{k}"] - v).max() for k, v in single.items())
        assert worst < 1e-5, worst
    moved = max(np.abs(single[k] - v).max() for k, v in tree_flatten(Model(ModelArgs.from_dict(TINY)).parameters())
                if k in single)
    assert moved > 1e-3  # the step did change the parameters


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_data_parallel_grpo_step_equals_single_process_step(ranks, grpo_model, case):
    """Fixed rollouts (a function of the prompt): 2 ranks, each rolling out 2 of the step's 4 prompts, against one
    process rolling out all 4. The averaged gradient, the parameters after the step and the step's metrics match
    (grpo: sequence-count normaliser; dapo: global token count, batch-std advantages, mu = 2; expert loads summed)."""
    grads, row, params = grpo_step(str(grpo_model), case, None)
    base = {k: np.array(v) for k, v in tree_flatten(Model(ModelArgs.from_dict(TINY)).parameters())}
    for rank in ranks:
        got = json.loads(str(rank[f"grpo:{case}/row"]))
        for key in ("loss", "grad_norm", "kl", "entropy", "reward", "reward_std", "completion_length",
                    "load_max_mean_worst"):
            assert got[key] == pytest.approx(row[key], rel=1e-5, abs=1e-6), (case, key)
        scale = max(np.abs(v).max() for v in grads.values())
        assert scale > 1e-4  # a gradient flows
        assert max(np.abs(rank[f"grpo:{case}/grad/{k}"] - v).max() for k, v in grads.items()) <= 1e-5 * scale
        worst = max(np.abs(rank[f"grpo:{case}/param/{k}"] - v).max() for k, v in params.items())
        assert worst < 1e-5, (case, worst)
    moved = [k for k, v in params.items() if k not in base or np.abs(v - base[k]).max() > 1e-4]
    assert any(k.endswith("lora_b") for k in moved)


def test_the_difficulty_filter_agrees_across_ranks(ranks, grpo_model):
    """Every rank's filter learns every rank's outcomes: the ranks skip the same prompts as one process (on the
    same fixed rollouts), and together roll out the prompts it rolls out."""
    seen, state, position, skipped = filter_steps(str(grpo_model), None)
    assert sum(skipped) > 0
    got = [json.loads(str(rank["grpo/filter"])) for rank in ranks]
    for g in got:
        assert g["state"] == state and g["position"] == position and g["skipped"] == skipped
    assert sorted(p for g in got for call in g["seen"] for p in call) == sorted(p for call in seen for p in call)


def test_grpo_ranks_roll_out_their_own_prompts_and_resume(ranks, grpo_runs):
    """Real rollouts: rank r samples the r-th half of the prompts one process would take (so the ranks' groups
    differ); only rank 0 writes metrics; a run resumed after step 1 repeats the uninterrupted run's step 2."""
    seen = [json.loads(str(rank["grpo/rollouts"])) for rank in ranks]  # per rank: a1, a2, b1, b2 (resumed)
    assert [len(s) for s in seen] == [4, 4] and all(len(step) == 2 for s in seen for step in s)
    stream = PromptStream("arithmetic", None, seed=1, task_options=GRPO_RUN["task_options"])
    expected = [r["prompt"] for r in stream.take(8)]
    for step in range(2):
        assert [p for s in seen for p, _ in s[step]] == expected[4 * step: 4 * step + 4]
        assert [c for _, c in seen[0][step]] != [c for _, c in seen[1][step]]
    for s in seen:
        assert s[2:] == s[:2]  # run b (1 step, then resumed) rolls out exactly what run a did
    a, b = read_metrics(grpo_runs / "a"), read_metrics(grpo_runs / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for key in ("reward", "loss", "kl", "completion_length", "grad_norm"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-5, abs=1e-7), key
    wa, wb = (mx.load(str(grpo_runs / run / "adapters" / ADAPTER_FILE)) for run in ("a", "b"))
    assert wa.keys() == wb.keys() and all(np.abs(np.array(wa[k]) - np.array(wb[k])).max() < 1e-6 for k in wa)


def test_generate_command_on_the_ranks(ranks, chat_model, capsys):
    """`mlx-deepseek generate --parallel ep|pp` inside mlx.launch: rank 0 prints the single-process answer,
    the other ranks print nothing; the ranks agree on one sampling seed."""
    argv = ["generate", "--model", str(chat_model), "--prompt", "w5 w6 w7 w8", "--raw", "--max-tokens", "8",
            "--dtype", "float32", "--json"]
    assert main(argv) == 0
    single = json.loads(capsys.readouterr().out)
    for mode in ("ep", "pp"):
        got = json.loads(str(ranks[0][f"cli:{mode}"]))
        assert got["tokens"] == single["tokens"] and got["text"] == single["text"]
        assert str(ranks[1][f"cli:{mode}"]) == ""
    assert int(ranks[0]["seed"]) == int(ranks[1]["seed"])


def test_launch_flags_become_an_mlx_launch_command():
    argv = ["generate", "--prompt", "hi", "--parallel", "ep", "--ranks", "2", "--backend=ring", "--max-tokens", "4"]
    assert rank_command(argv)[3:] == ["generate", "--prompt", "hi", "--parallel", "ep", "--max-tokens", "4"]
    cmd = launch_command(["python", "x.py"], ranks=2, backend="ring")
    assert cmd[cmd.index("-n") + 1] == "2" and cmd[cmd.index("--backend") + 1] == "ring" and cmd[-3:] == ["--", "python", "x.py"]
    cmd = launch_command(["python", "x.py"], hostfile="hosts.json")
    assert cmd[cmd.index("--hostfile") + 1] == "hosts.json" and "--backend" not in cmd  # the hostfile's own
