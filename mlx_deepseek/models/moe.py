"""Feed-forward blocks: the dense SwiGLU MLP and DeepSeekMoE (router, routed experts, shared experts)."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from ..config import ModelArgs
from . import fastmath


def swiglu(up: mx.array, gate: mx.array) -> mx.array:
    """silu(W_gate x) * W_up x, from the two products (mlx-lm SwitchGLU's `activation(x_up, x_gate)` order)."""
    return fastmath.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.up_proj(x), self.gate_proj(x)))


@partial(mx.compile, shapeless=False)
def select_experts(
    logits: mx.array,
    bias: mx.array,
    top_k: int,
    n_group: int,
    topk_group: int,
    scoring_func: str,
    group_score: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
):
    """Token-to-expert routing: returns (expert indices, gate weights), both [..., top_k].

    s = softmax(u.e) (DeepSeekMoE, V2) or sigmoid(u.e) (V3). Selection ranks s + b (b, V3's
    aux-loss-free correction bias, is zero otherwise) inside the `topk_group` best of `n_group`
    groups (a group scores by its max (V2) or top-2 sum (V3)); the gate weights are the
    unbiased s of the chosen experts, renormalised if `norm_topk_prob`, times the scaling factor.
    """
    logits = logits.astype(mx.float32)
    scores = mx.softmax(logits, axis=-1) if scoring_func == "softmax" else mx.sigmoid(logits)
    choice = scores + bias
    if topk_group < n_group:
        grouped = mx.unflatten(choice, -1, (n_group, -1))
        if group_score == "max" or grouped.shape[-1] < 2:
            per_group = grouped.max(axis=-1)
        else:
            per_group = mx.topk(grouped, 2, axis=-1).sum(axis=-1)
        dropped = mx.argpartition(per_group, kth=n_group - topk_group - 1, axis=-1)[..., : n_group - topk_group]
        grouped = mx.put_along_axis(grouped, dropped[..., None], mx.array(-mx.inf, mx.float32), axis=-2)
        choice = mx.flatten(grouped, -2, -1)
    inds = mx.stop_gradient(mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if top_k > 1 and norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, weights * routed_scaling_factor


class Router(nn.Module):
    """The gate of DeepSeekMoE: expert centroids e_i (`weight`) and, for `noaux_tc`, the bias b_i."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.scoring_func = args.scoring_func
        self.group_score = "top2_sum" if args.topk_method == "noaux_tc" else "max"
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if args.topk_method == "noaux_tc":
            self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array):
        bias = self.get("e_score_correction_bias", mx.array(0.0))
        return select_experts(
            x @ self.weight.T, bias, self.top_k, self.n_group, self.topk_group,
            self.scoring_func, self.group_score, self.norm_topk_prob, self.routed_scaling_factor,
        )


class RoutingTrace:
    """Collects each MoE layer's routing (expert indices and gate weights, lazy arrays) while attached.

    `Model.set_routing_trace(trace)` attaches one; every forward pass then appends
    (layer, inds [B, L, k], weights [B, L, k]) per MoE layer. Detached (None), it costs nothing.
    """

    def __init__(self):
        self.records: list[tuple[int, mx.array, mx.array]] = []

    def record(self, moe: "DeepSeekMoE", x: mx.array, inds: mx.array, weights: mx.array) -> None:
        """Called by each MoE layer with its input x; keeps (layer, inds, weights)."""
        self.records.append((moe.layer, inds, weights))

    def clear(self) -> None:
        self.records.clear()


class RoutedExperts(nn.Module):
    """The routed experts of one layer, stacked: SwiGLU per expert, run on the chosen ones only (gather_mm /
    gather_qmm). W_gate and W_up are one stack [E, 2 * I, D] (`gate_up_proj`, as vLLM's w13), so a token's experts
    take two gathered products, not three. Checkpoints keep mlx-lm's `gate_proj` and `up_proj`: the loader joins
    them and `save_model` splits them (weights.join_gate_up / split_gate_up)."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int):
        super().__init__()
        self.gate_up_proj = SwitchLinear(dim, 2 * hidden_dim, n_experts, bias=False)
        self.down_proj = SwitchLinear(hidden_dim, dim, n_experts, bias=False)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., D], indices [..., k] -> each chosen expert's output [..., k, D]."""
        x = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= 64  # many tokens: sorted by expert, so each expert's weights are read once
        idx = indices
        if do_sort:
            x, idx, inv_order = _gather_sort(x, indices)
        gate, up = mx.split(self.gate_up_proj(x, idx, sorted_indices=do_sort), 2, axis=-1)
        y = self.down_proj(swiglu(up, gate), idx, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv_order, indices.shape)
        return y.squeeze(-2)


class DeepSeekMoE(nn.Module):
    """h + sum_i FFN_i^(s)(u) + sum_i g_i FFN_i^(r)(u) (DeepSeekMoE §3): shared plus routed experts.

    The routed experts are one stack (RoutedExperts) run with gather_mm / gather_qmm over the chosen
    indices, so there is no Python loop over experts.
    """

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.trace = None  # a RoutingTrace while one is attached
        self.expert_group = None  # expert parallelism (parallel.shard_experts): the ranks holding the other experts
        self.gate = Router(args)
        self.switch_mlp = RoutedExperts(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts)
        if args.n_shared_experts:
            self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)

    def __call__(self, x: mx.array) -> mx.array:
        inds, weights = self.gate(x)
        if self.trace is not None:
            self.trace.record(self, x, inds, weights)
        y = self.switch_mlp(x, inds)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        if self.expert_group is not None:  # each rank added its own experts' part
            y = mx.distributed.all_sum(y, group=self.expert_group)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y
