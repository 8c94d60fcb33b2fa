"""Expert load balance in training: V3's aux-loss-free bias update and the balance losses of V2 and V3.

- `update_bias` (V3 §2.1.2): after each optimizer step, b_i += gamma * sign(mean load - load_i) in every
  MoE layer, from the step's expert counts. b only steers selection (select_experts ranks s + b; the gate
  weights are the unbiased s), and it is frozen: the optimizer never sees it.
- `sequence_balance_loss` (V3 eq. 17-20): the complementary sequence-wise loss alpha * sum_i f_i P_i per
  sequence, with P from the normalised scores s'_{i,t} = s_{i,t} / sum_j s_{j,t}.
- `expert_balance_loss` (V2 eq. 23-25) and `device_balance_loss` (V2 eq. 26-28, experts in D equal device
  groups): the same product over the whole batch, per expert and per device group.

`BalanceTrace` collects what these need in one forward pass through the model's RoutingTrace hook: each
MoE layer's chosen experts and, when a loss needs them, the router inputs, from which the scores s of all
experts are recomputed (differentiably).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..models.moe import DeepSeekMoE, Router, RoutingTrace


class BalanceTrace(RoutingTrace):
    """A RoutingTrace that can also keep each router's input (for the balance losses)."""

    def __init__(self, record_inputs: bool = False):
        super().__init__()
        self.record_inputs = record_inputs
        self.inputs: list[tuple[Router, mx.array]] = []

    def record(self, moe: DeepSeekMoE, x: mx.array, inds: mx.array, weights: mx.array) -> None:
        super().record(moe, x, inds, weights)
        if self.record_inputs:
            self.inputs.append((moe.gate, x))

    def clear(self) -> None:
        super().clear()
        self.inputs.clear()


def moe_layers(model: nn.Module) -> list[DeepSeekMoE]:
    """The model's MoE blocks (main model, then MTP modules), in layer order."""
    return sorted((m for _, m in model.named_modules() if isinstance(m, DeepSeekMoE)), key=lambda m: m.layer)


def attach(model: nn.Module, record_inputs: bool = False) -> BalanceTrace:
    """Attach a BalanceTrace to every MoE layer (keeping router inputs too with record_inputs)."""
    trace = BalanceTrace(record_inputs)
    model.set_routing_trace(trace)
    return trace


def detach(model: nn.Module) -> None:
    model.set_routing_trace(None)


def freeze_bias(model: nn.Module) -> None:
    """Exclude every `e_score_correction_bias` from the trainable parameters (it moves by update_bias only)."""
    model.freeze(recurse=True, keys=["e_score_correction_bias"], strict=False)


# ---- counts and statistics --------------------------------------------------------------------
def one_hot_selection(inds: mx.array, n_experts: int) -> mx.array:
    """[..., k] expert indices -> [..., n_experts] 0/1 selection (float32)."""
    return (inds[..., None] == mx.arange(n_experts)).astype(mx.float32).sum(axis=-2)


def layer_counts(trace: RoutingTrace, n_experts: int, layers: list[int], tokens: Optional[mx.array] = None) -> mx.array:
    """[len(layers), n_experts]: how many tokens each expert of these MoE layers received in the traced
    pass(es); zeros for a layer that did not run (the MTP module when no MTP loss is computed). tokens: a [B, L]
    mask of the positions to count (padding left out)."""
    by_layer: dict[int, mx.array] = {}
    for layer, inds, _ in trace.records:
        chosen = one_hot_selection(inds, n_experts)
        if tokens is not None:
            chosen = chosen * tokens[..., None].astype(chosen.dtype)
        c = chosen.reshape(-1, n_experts).sum(axis=0)
        by_layer[layer] = by_layer[layer] + c if layer in by_layer else c
    if not layers:
        return mx.zeros((0, n_experts))
    return mx.stack([by_layer.get(k, mx.zeros((n_experts,))) for k in layers])


def load_ratio(counts) -> list[float]:
    """max load / mean load per layer (1.0 is perfect balance) from [layers, experts] counts."""
    import numpy as np

    c = np.asarray(counts, dtype=np.float64)
    mean = c.mean(axis=-1)
    return [float(m / a) if a > 0 else 0.0 for m, a in zip(c.max(axis=-1), mean)]


# ---- the bias update --------------------------------------------------------------------------
def update_bias(model: nn.Module, counts: mx.array, gamma: float) -> None:
    """b_i += gamma * sign(mean_j load_j - load_i), per MoE layer (counts [layers, experts] in layer order)."""
    layers = moe_layers(model)
    if gamma == 0 or not layers:
        return
    if counts.shape[0] != len(layers):
        raise ValueError(f"counts for {counts.shape[0]} MoE layers, the model has {len(layers)}")
    for moe, c in zip(layers, counts):
        gate = moe.gate
        if "e_score_correction_bias" not in gate:
            continue  # softmax routers (V2, DeepSeekMoE) have no bias
        b = gate.e_score_correction_bias
        gate.e_score_correction_bias = b + gamma * mx.sign(c.mean() - c).astype(b.dtype)


# ---- the balance losses -----------------------------------------------------------------------
def _scores(router: Router, x: mx.array) -> mx.array:
    """The unbiased affinities s_{i,t} of all experts, normalised to sum 1 per token."""
    logits = (x @ router.weight.T).astype(mx.float32)
    if router.scoring_func == "softmax":
        return mx.softmax(logits, axis=-1)
    s = mx.sigmoid(logits)
    return s / (s.sum(axis=-1, keepdims=True) + 1e-20)


def sequence_balance_loss(scores: mx.array, inds: mx.array, top_k: int) -> mx.array:
    """V3 eq. 17-20: mean over sequences of sum_i f_i P_i, f_i = N_r/(K_r T) * #tokens routed to i,
    P_i = mean_t s'_{i,t}. scores [B, T, E] (normalised), inds [B, T, K]."""
    _, t, e = scores.shape
    f = mx.stop_gradient(one_hot_selection(inds, e).sum(axis=1) * (e / (top_k * t)))  # [B, E]
    p = scores.mean(axis=1)  # [B, E]
    return (f * p).sum(axis=-1).mean()


def _batch_f_p(scores: mx.array, inds: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    e = scores.shape[-1]
    scores, sel = scores.reshape(-1, e), one_hot_selection(inds, e).reshape(-1, e)
    t = scores.shape[0]
    return mx.stop_gradient(sel.sum(axis=0) * (e / (top_k * t))), scores.mean(axis=0)


def expert_balance_loss(scores: mx.array, inds: mx.array, top_k: int) -> mx.array:
    """V2 eq. 23-25: sum_i f_i P_i over all tokens of the batch."""
    f, p = _batch_f_p(scores, inds, top_k)
    return (f * p).sum()


def device_balance_loss(scores: mx.array, inds: mx.array, top_k: int, n_devices: int) -> mx.array:
    """V2 eq. 26-28: experts split into `n_devices` equal consecutive groups; f'_d = mean of f_i over the
    group, P'_d = sum of P_i over the group; loss sum_d f'_d P'_d."""
    f, p = _batch_f_p(scores, inds, top_k)
    if f.shape[0] % n_devices:
        raise ValueError(f"n_devices={n_devices} must divide n_routed_experts={f.shape[0]}")
    return (f.reshape(n_devices, -1).mean(axis=-1) * p.reshape(n_devices, -1).sum(axis=-1)).sum()


def balance_losses(trace: BalanceTrace, seq_alpha: float, expert_alpha: float, device_alpha: float, n_devices: int):
    """alpha-weighted sum of the enabled balance losses over all MoE layers (0.0 when none is enabled)."""
    total = mx.array(0.0)
    if not (seq_alpha or expert_alpha or device_alpha):
        return total
    if len(trace.inputs) != len(trace.records):
        raise RuntimeError("balance losses need router inputs: attach(model, record_inputs=True)")
    for (router, x), (_, inds, _) in zip(trace.inputs, trace.records):
        s = _scores(router, x)
        if seq_alpha:
            total = total + seq_alpha * sequence_balance_loss(s, inds, router.top_k)
        if expert_alpha:
            total = total + expert_alpha * expert_balance_loss(s, inds, router.top_k)
        if device_alpha:
            total = total + device_alpha * device_balance_loss(s, inds, router.top_k, n_devices)
    return total
