"""HTML views of a generation: the stats line, the expert heatmap, the load-balance summary, the per-token
view and the model panel. Pure functions of library objects (ExpertTrace, GenerationResult, describe()),
so they are tested without a browser and need no plotting library."""

from __future__ import annotations

import html
from typing import Optional, Sequence

import numpy as np

from mlx_deepseek.info import human

EMPTY = "<div class='mlxds-empty'>No answer yet: ask something and the experts it used appear here.</div>"


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


# ---- the stats line ---------------------------------------------------------------------------------
def stats_line(result, reused_tokens: int = 0, thinking_s: Optional[float] = None) -> str:
    """One line per answer: prompt and generation speed and token counts, peak memory, MTP acceptance."""
    parts = [
        f"prompt {result.prompt_tokens} tokens"
        + (f" ({reused_tokens} reused from the cache)" if reused_tokens else "")
        + f", {result.prompt_tps:.0f} tok/s",
        f"generation {result.generation_tokens} tokens, {result.generation_tps:.1f} tok/s",
        f"peak memory {result.peak_memory_gb * 1000:.1f} MB" if result.peak_memory_gb < 1 else f"peak memory {result.peak_memory_gb:.2f} GB",
    ]
    if result.mtp_acceptance is not None:
        parts.append(f"MTP acceptance {result.mtp_acceptance:.0%} ({result.mtp_accepted}/{result.mtp_drafted})")
    if thinking_s is not None:
        parts.append(f"thought for {thinking_s:.1f} s")
    if result.finish_reason == "length":
        parts.append("stopped at max tokens")
    return " · ".join(parts)


# ---- expert views -------------------------------------------------------------------------------------
def _cell_colour(x: float) -> str:
    """0 -> near white, 1 -> deep blue (a light-to-dark ramp that reads on white and dark themes)."""
    x = float(min(max(x, 0.0), 1.0))
    lo, hi = np.array([240, 244, 250]), np.array([16, 62, 140])
    r, g, b = (lo + (hi - lo) * x).round().astype(int)
    return f"rgb({r},{g},{b})"


def _text_colour(x: float) -> str:
    return "#fff" if x > 0.5 else "#1f2937"


STYLE = """
<style>
.mlxds-heat { border-collapse: collapse; font: 11px/1.2 ui-monospace, monospace; }
.mlxds-heat td, .mlxds-heat th { padding: 0; text-align: center; }
.mlxds-heat td.c { width: 22px; height: 22px; border: 1px solid #fff; }
.mlxds-heat th.l { text-align: right; padding-right: 6px; white-space: nowrap; font-weight: 600; }
.mlxds-heat td.gap { width: 14px; border: none; }
.mlxds-heat td.s { width: 30px; height: 22px; border: 1px solid #fff; background: #9ca3af; color: #fff; }
.mlxds-note { font-size: 12px; color: #6b7280; margin: 4px 0; }
.mlxds-table { border-collapse: collapse; font-size: 12px; }
.mlxds-table td, .mlxds-table th { border: 1px solid #d1d5db; padding: 2px 6px; text-align: right; }
.mlxds-tok { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.mlxds-tok mark { background: #fde68a; color: #111; }
.mlxds-empty { color: #6b7280; font-style: italic; padding: 8px 0; }
</style>
"""


def heatmap_html(trace, n_shared: int = 0, dense_layers: Sequence[int] = ()) -> str:
    """Layers x experts: how many generated tokens chose each routed expert, one coloured cell each; the
    shared experts, which run on every token, in their own column group."""
    if trace is None or not trace.experts:
        return EMPTY
    load = trace.load
    tokens = len(trace.experts)
    top = max(int(load.max()), 1)
    small = trace.n_experts <= 64  # numbers in the cells only while they fit
    head = "".join(f"<th title='expert {e}'>{e if small or e % 8 == 0 else ''}</th>" for e in range(trace.n_experts))
    shared_head = "".join(f"<th>S{j}</th>" for j in range(n_shared))
    rows = [f"<tr><th class='l'>layer \\ expert</th>{head}" + (f"<td class='gap'></td>{shared_head}" if n_shared else "") + "</tr>"]
    for i, layer in enumerate(trace.layers):
        cells = []
        for e in range(trace.n_experts):
            n = int(load[i, e])
            x = n / top
            cells.append(
                f"<td class='c' style='background:{_cell_colour(x)};color:{_text_colour(x)}' "
                f"title='layer {layer}, expert {e}: chosen for {n} of {tokens} tokens'>{n if small and n else ''}</td>"
            )
        shared = "".join(
            f"<td class='s' title='layer {layer}, shared expert {j}: runs on all {tokens} tokens'>{tokens}</td>" for j in range(n_shared)
        )
        rows.append(f"<tr><th class='l'>layer {layer}</th>{''.join(cells)}" + (f"<td class='gap'></td>{shared}" if n_shared else "") + "</tr>")
    k = trace.experts[0].shape[1]
    notes = [f"Selection counts over the {tokens} generated tokens (top-{k} of {trace.n_experts} routed experts per token and layer; darker = chosen more often)."]
    if n_shared:
        notes.append(f"S: {n_shared} shared expert{'s' if n_shared > 1 else ''} per MoE layer, shown apart: "
                     "a shared expert is not routed, it fires for every token.")
    if dense_layers:
        notes.append(f"Layer{'s' if len(dense_layers) > 1 else ''} {', '.join(map(str, dense_layers))}: dense feed-forward (no experts).")
    note = "".join(f"<div class='mlxds-note'>{_esc(n)}</div>" for n in notes)
    return f"{STYLE}<div id='mlxds-heatmap' style='overflow-x:auto'><table class='mlxds-heat'>{''.join(rows)}</table>{note}</div>"


def load_summary_html(trace) -> str:
    """Per MoE layer: max/mean load (1.0 is perfectly balanced), the busiest expert and the idle ones."""
    if trace is None or not trace.experts:
        return EMPTY
    load = trace.load
    rows = ["<tr><th>layer</th><th>max / mean</th><th>busiest expert</th><th>least used</th><th>idle experts</th></tr>"]
    ratios = []
    for i, layer in enumerate(trace.layers):
        row = load[i]
        mean = row.mean()
        ratio = row.max() / mean if mean > 0 else 0.0
        ratios.append(ratio)
        idle = int((row == 0).sum())
        rows.append(
            f"<tr><td>{layer}</td><td>{ratio:.2f}</td><td>{int(row.argmax())} ({int(row.max())})</td>"
            f"<td>{int(row.argmin())} ({int(row.min())})</td><td>{idle} of {len(row)}</td></tr>"
        )
    summary = (f"<div class='mlxds-note'>Load balance: max/mean selection count per layer (1.00 = every expert equally used; "
               f"worst layer {max(ratios):.2f}, mean {float(np.mean(ratios)):.2f}).</div>")
    return f"{STYLE}<div id='mlxds-load'>{summary}<table class='mlxds-table'>{''.join(rows)}</table></div>"


def token_label(text: str) -> str:
    """A token's text made visible (spaces and newlines shown)."""
    return text.replace("\n", "\\n").replace(" ", "␣") if text.strip() != text or not text else text


def token_view_html(trace, token_texts: Sequence[str], index: int, n_shared: int = 0, context: int = 8) -> str:
    """One generated token: the experts of the forward pass that produced it and their gate weights per layer."""
    if trace is None or not trace.experts:
        return EMPTY
    n = len(trace.experts)
    index = int(min(max(int(index or 0), 0), n - 1))
    texts = list(token_texts) + ["<end of sequence>"] * max(0, n - len(token_texts))
    lo, hi = max(0, index - context), min(n, index + context + 1)
    ctx = "".join(_esc(t) if j != index else f"<mark>{_esc(t)}</mark>" for j, t in enumerate(texts[lo:hi], start=lo))
    experts, weights = trace.experts[index], trace.weights[index]
    k = experts.shape[1]
    head = "".join(f"<th>expert #{j + 1}</th><th>gate</th>" for j in range(k))
    rows = [f"<tr><th>layer</th>{head}" + ("<th>shared</th>" if n_shared else "") + "</tr>"]
    for i, layer in enumerate(trace.layers):
        order = np.argsort(-weights[i])
        cells = "".join(f"<td>{int(experts[i, j])}</td><td>{float(weights[i, j]):.3f}</td>" for j in order)
        shared = f"<td>{', '.join(f'S{s}' for s in range(n_shared))} (always)</td>" if n_shared else ""
        rows.append(f"<tr><td>{layer}</td>{cells}{shared}</tr>")
    return (
        f"{STYLE}<div id='mlxds-token'><div class='mlxds-note'>Token {index} of {n}: "
        f"<b class='mlxds-tok'>{_esc(token_label(texts[index]))}</b> — the experts that produced it, by gate weight.</div>"
        f"<div class='mlxds-tok'>…{ctx}…</div><table class='mlxds-table'>{''.join(rows)}</table></div>"
    )


# ---- the model panel ----------------------------------------------------------------------------------
def model_html(d: dict) -> str:
    """describe()'s fields as a small table."""
    rows = [
        ("model", d["path"]),
        ("family", f"{d['family']} ({d['model_type']})"),
        ("attention", f"{d['attention']}, {d['layers']} layers"),
        ("feed-forward", d["moe"]),
        ("parameters", human(d["parameters"])),
        ("active parameters", f"{human(d['active_parameters'])} per token"),
        ("MTP module", human(d["mtp_parameters"]) if d.get("mtp_parameters") else "none"),
        ("quantization", d["quantization"]),
        ("on disk", human(d["disk_bytes"], "B")),
        ("KV cache", f"{human(d['kv_cache_bytes_per_token'], 'B')} per token"
         + (f" (MHA would need {human(d['mha_kv_cache_bytes_per_token'], 'B')})" if d["attention"] == "MLA" else "")),
    ]
    body = "".join(f"<tr><th style='text-align:left'>{_esc(k)}</th><td style='text-align:left'>{_esc(v)}</td></tr>" for k, v in rows)
    return f"{STYLE}<table id='mlxds-model' class='mlxds-table'>{body}</table>"
