"""Beyond one machine, over MLX's own distributed layer (`mx.distributed`: ring over TCP, JACCL over RDMA,
MPI, NCCL on CUDA), launched with `mlx.launch`.

- expert parallelism (`experts`): each rank holds a contiguous block of every MoE layer's routed experts;
  activations, attention, the router and the shared experts are replicated, each rank applies its own
  experts to the token slots routed to them, and one `all_sum` per MoE layer combines the parts.
- pipeline parallelism (`pipeline`): each rank runs a contiguous block of decoder layers; the hidden state
  goes rank to rank with send/recv and the last stage's output reaches every rank, so all ranks sample
  the same next token.
- rank-local loading (`loading`): a rank reads from disk only its layers (PP) or its experts' rows of the
  stacked expert tensors (EP, by safetensors byte offsets), plus the replicated tensors.
- data parallelism (`data`): gradients averaged in one function (`average_gradients`), each rank a shard
  of the batch; the loss is normalised by the global token count, so a DP step equals the single-process
  step on the concatenated batch.
- launching (`launch`): `mlx.launch` command lines for a hostfile or N local ranks.
"""

from .data import active, average_gradients, common_seed, gather_rows, global_sum, rank_block, shard_rows
from .experts import LocalExperts, shard_experts
from .loading import Shard, load_sharded, plan
from .pipeline import PipelineStage, pipeline, split

__all__ = [
    "LocalExperts", "PipelineStage", "Shard", "active", "average_gradients", "common_seed", "gather_rows", "global_sum",
    "load_sharded", "pipeline", "plan", "rank_block", "shard_experts", "shard_rows", "split",
]


def join(path_or_repo, parallel: str, dtype=None, seed=None):
    """A rank's setup for distributed generation (inside mlx.launch): (this rank's part of the model, the
    tokenizer, one sampling seed for every rank). Ranks other than 0 print nothing (stdout to /dev/null)."""
    import os
    import sys

    import mlx.core as mx

    from ..loading import resolve
    from ..tokenizer import load_tokenizer

    group = mx.distributed.init()
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")
    folder = resolve(path_or_repo)
    model = load_sharded(folder, parallel, group, dtype)
    return model, load_tokenizer(folder), common_seed(seed, group)
