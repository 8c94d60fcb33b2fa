"""The chat app's handlers, called directly on the bundled model (greedy, short answers), and its views."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gradio")

from app import chat_app as ca  # noqa: E402
from app import views  # noqa: E402
from app.engine import MAX_INPUT_CHARS, Engine, Session, Settings, to_model_messages  # noqa: E402
from mlx_deepseek.generate import ExpertTrace  # noqa: E402

GREEDY = Settings(temperature=0.0, max_tokens=160, mtp=True)
QUESTION = "What is 347 + 285?"


@pytest.fixture(scope="module")
def engine():
    return Engine(None)


def run(gen):
    outs = list(gen)
    assert outs
    return outs


def test_respond_streams_thinking_then_answer_with_stats_and_experts(engine):
    session = Session()
    outs = run(ca.respond(engine, session, QUESTION, [], GREEDY))
    # while streaming: the Thinking block is pending and the textbox is cleared
    streaming = [o for o in outs[:-1] if any(m.get("metadata", {}).get("status") == "pending" for m in o[1])]
    assert streaming and all(o[0] == "" for o in outs)
    text, history, stats, heatmap, load, slider, token = outs[-1]
    user, thinking, answer = history
    assert user == {"role": "user", "content": QUESTION}
    assert thinking["metadata"]["title"] == "Thinking" and thinking["metadata"]["status"] == "done"
    assert thinking["metadata"]["duration"] > 0
    assert "column by column" in thinking["content"] and "</think>" not in thinking["content"]
    assert "\\boxed{" in answer["content"] and "column" not in answer["content"]
    result = session.result
    assert result.reasoning.strip() == thinking["content"].strip() and result.answer == answer["content"]
    for part in ("prompt 18 tokens", f"generation {result.generation_tokens} tokens", "tok/s", "peak memory", "MTP acceptance"):
        assert part in stats
    # the heatmap: 5 MoE layers x 16 routed experts, the shared expert apart, counts summing to tokens x top-k
    assert heatmap.count("class='c'") == 5 * 16 and heatmap.count("class='s'") == 5
    assert "fires for every token" in heatmap and "Layer 0: dense" in heatmap
    trace = session.trace
    assert trace.load.sum(axis=1).tolist() == [len(trace.experts) * 2] * 5
    assert "max / mean" in load
    assert slider.maximum == len(trace.experts) - 1 and slider.interactive
    assert "Token 0 of" in token


def test_multi_turn_drops_old_reasoning_and_reuses_the_prompt_cache(engine):
    session = Session()
    history = run(ca.respond(engine, session, QUESTION, [], GREEDY))[-1][1]
    reasoning = history[1]["content"]
    messages = to_model_messages(history, "Be brief.")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": history[2]["content"]},
    ]
    prompt, _ = engine.prompt(messages + [{"role": "user", "content": "What is 12 + 30?"}])
    assert reasoning.strip() not in prompt
    outs = run(ca.respond(engine, session, "What is 12 + 30?", history, GREEDY))
    assert len(outs[-1][1]) == 6 and session.reused > 10  # the first turn's prefix came from the cache
    assert "reused from the cache" in outs[-1][2]


def test_gradio_message_parts_become_text():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None},
        {"role": "assistant", "content": [{"type": "text", "text": "secret"}], "metadata": {"title": "Thinking"}},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}], "metadata": {}},
        {"role": "assistant", "content": "oops", "metadata": {"title": "⚠️ Error while generating"}},
    ]
    assert to_model_messages(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_regenerate_replaces_the_last_answer_and_seed_repeats_it(engine):
    session = Session()
    sampled = Settings(temperature=1.0, top_p=0.95, max_tokens=48, seed=7, mtp=False)
    first = run(ca.respond(engine, session, QUESTION, [], sampled))[-1][1]
    again = run(ca.regenerate(engine, session, first, sampled))[-1][1]
    assert [m["role"] for m in again] == [m["role"] for m in first]
    assert again[1]["content"] == first[1]["content"]  # same seed, same sample
    other = run(ca.regenerate(engine, session, first, Settings(temperature=1.0, max_tokens=48, seed=8, mtp=False)))[-1][1]
    assert other[0] == first[0] and len(other) >= 2
    assert run(ca.regenerate(engine, Session(), [], sampled))[-1][2] == "Nothing to regenerate yet."


def test_stop_ends_the_answer_and_closes_thinking(engine):
    session = Session()
    gen = ca.respond(engine, session, QUESTION, [], Settings(temperature=0.0, max_tokens=400))
    next(gen)  # the user message is in; generation starts with the next step
    ca.stop(session)
    outs = list(gen)
    text, history, stats = outs[-1][:3]
    assert stats == "Stopped."
    assert all(m.get("metadata", {}).get("status") != "pending" for m in history)
    # the session's cache stays usable: the next question is answered normally
    outs = run(ca.respond(engine, session, QUESTION, [], GREEDY))
    assert "\\boxed{" in outs[-1][1][-1]["content"]


def test_overlong_input_is_refused_with_a_clear_message(engine):
    session = Session()
    history = [{"role": "user", "content": "earlier"}]
    out = run(ca.respond(engine, session, "x" * (MAX_INPUT_CHARS + 1), history, GREEDY))[-1]
    assert out[0].startswith("xxx") and out[1] == history and "at most" in out[2]
    long = " ".join(["What is 347 + 285?"] * 200)  # ~1,800 tokens > nano-r1's 1,024
    out = run(ca.respond(engine, session, long, [], GREEDY))[-1]
    assert out[0] == long and out[1] == [] and "context of 1,024 tokens" in out[2] and "Clear" in out[2]
    assert session.cache is None  # nothing ran
    # a prompt that fits but leaves less room than max tokens: max tokens is lowered, not refused
    near = " ".join(["What is 347 + 285?"] * 60)
    gen = ca.respond(engine, session, near, [], Settings(temperature=0.0, max_tokens=1024))
    first = next(gen)
    gen.close()
    assert "max tokens lowered to" in first[2] and first[1][0]["content"] == near


def test_a_failing_generation_is_shown_and_the_app_keeps_working(engine, monkeypatch):
    import mlx_deepseek.generate as g

    real = g.stream_generate

    def broken(*a, **k):
        yield from ()
        raise RuntimeError("simulated failure")

    session = Session()
    monkeypatch.setattr(g, "stream_generate", broken)
    out = run(ca.respond(engine, session, QUESTION, [], GREEDY))[-1]
    assert "simulated failure" in out[2] and out[1][-1]["metadata"]["title"].endswith("Error while generating")
    monkeypatch.setattr(g, "stream_generate", real)
    history = out[1]
    out = run(ca.respond(engine, session, QUESTION, history, GREEDY))[-1]
    assert "\\boxed{" in out[1][-1]["content"]
    assert "simulated failure" not in engine.prompt(to_model_messages(out[1]))[0]


def test_clear_token_view_and_empty_message(engine):
    session = Session()
    run(ca.respond(engine, session, QUESTION, [], GREEDY))
    html = ca.token_view(engine, session, 3)
    assert "Token 3 of" in html and "<mark>" in html and "gate" in html and "S0 (always)" in html
    assert "Token " + str(len(session.trace.experts) - 1) in ca.token_view(engine, session, 10_000)  # clamped
    out = ca.clear(engine, session)
    assert out[:3] == ("", [], "") and out[3] == views.EMPTY and session.trace is None and session.cache is None
    assert run(ca.respond(engine, session, "   ", [], GREEDY))[-1][2] == "Type a message first."


def test_model_panel(engine, tmp_path):
    session = Session()
    card = views.model_html(engine.info)
    for part in ("DeepSeek-V3", "MLA, 6 layers", "16 routed (top-2", "active parameters", "affine 4-bit", "KV cache", "per token"):
        assert part in card
    out = ca.switch_model(engine, session, ca.BUNDLED_LABEL, str(tmp_path / "missing"))
    assert "Could not load" in out[1] and engine.info["model_type"] == "deepseek_v3"  # the old model stays
    version = engine.version
    out = ca.switch_model(engine, session, ca.BUNDLED_LABEL, "")
    assert out[1].startswith("Loaded") and engine.version == version + 1 and out[4] == []


def test_views_on_a_known_trace():
    trace = ExpertTrace(layers=[1, 2], n_experts=4)
    trace.experts = [np.array([[0, 1], [2, 3]]), np.array([[0, 2], [2, 1]]), np.array([[0, 3], [2, 0]])]
    trace.weights = [np.array([[0.6, 0.4], [0.3, 0.7]], np.float32)] * 3
    heat = views.heatmap_html(trace, n_shared=2)
    assert "chosen for 3 of 3 tokens" in heat and heat.count("class='s'") == 4 and "S1" in heat
    load = views.load_summary_html(trace)
    assert "<td>1</td><td>2.00</td><td>0 (3)</td>" in load  # layer 1: loads [3,1,1,1], max/mean 3/1.5
    tok = views.token_view_html(trace, ["a", " b"], 1)
    assert "Token 1 of 3" in tok and "<mark> b</mark>" in tok
    # sorted by gate weight: layer 2 shows expert 1 (0.7) before expert 2 (0.3)
    assert tok.index("<td>1</td><td>0.700</td>") < tok.index("<td>2</td><td>0.300</td>")
    assert views.heatmap_html(None) == views.EMPTY == views.token_view_html(ExpertTrace([1], 4), [], 0)


def test_app_is_queued_one_generation_at_a_time(engine):
    demo = ca.build_app(engine)
    fns = list(demo.fns.values())
    model_events = [f for f in fns if f.concurrency_id == "model"]
    assert len(model_events) == 4  # send (Enter and button), regenerate, load model
    assert all(f.concurrency_limit == 1 for f in model_events)
    assert demo._queue.default_concurrency_limit == 1


def test_chat_command_defaults_and_expert_memory(capsys):
    from mlx_deepseek.cli import build_parser, main

    a = build_parser().parse_args(["chat"])
    assert (a.model, a.host, a.port, a.no_browser, a.share, a.expert_memory) == (None, "127.0.0.1", 7860, False, False, None)
    # offloading reaches the load: a budget below top_k experts per layer stops before the app starts
    assert main(["chat", "--expert-memory", "1KB", "--no-browser"]) == 2
    assert "offloading needs at least" in capsys.readouterr().err
