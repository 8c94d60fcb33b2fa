"""The Gradio chat app: streaming answers with the reasoning in a collapsible "Thinking" block, the experts the
answer used, a stats line per answer, and a model panel.

The handlers (`respond`, `regenerate`, `stop`, `clear`, `token_view`, `switch_model`) are plain functions of
an Engine, a Session and the widget values, so they are tested without a browser; `build_app` wires them to
widgets and `launch` serves them (127.0.0.1, no share link unless asked, one generation at a time)."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reporting to Gradio's servers

from typing import Iterator, Optional

import gradio as gr

from . import views
from .engine import BUNDLED_LABEL, Engine, InputTooLong, Session, Settings, local_models, message_text, now, to_model_messages

EXAMPLES = [
    "What is 347 + 285?",
    "What is 23 × 17?",
    "Which is larger, 4821 or 4812?",
    "How many times does the letter r appear in strawberry?",
    "计算 56 - 29。",
]
STREAM_EVERY_S = 0.05  # at most this often a streamed update is sent to the browser
THINKING = "Thinking"


# ---- handlers -----------------------------------------------------------------------------------------
def expert_views(engine: Engine, session: Session) -> tuple:
    """(heatmap, load summary, token slider, token view) of the session's last answer."""
    trace = session.trace
    n = len(trace.experts) if trace is not None else 0
    slider = gr.Slider(minimum=0, maximum=max(n - 1, 1), value=0, step=1, interactive=n > 0,
                       label=f"token (0 - {max(n - 1, 0)})" if n else "token")
    return (
        views.heatmap_html(trace, engine.n_shared, engine.dense_layers),
        views.load_summary_html(trace),
        slider,
        views.token_view_html(trace, session.token_texts, 0, engine.n_shared),
    )


def _unchanged() -> tuple:
    return gr.skip(), gr.skip(), gr.skip(), gr.skip()


def respond(engine: Engine, session: Session, message: str, history: list, settings: Settings) -> Iterator[tuple]:
    """Stream one answer. Yields (textbox, chatbot, stats, heatmap, load, token slider, token view)."""
    history = list(history or [])
    message = message or ""
    if not message.strip():
        yield (message, history, "Type a message first.", *_unchanged())
        return
    try:
        messages = to_model_messages(history, settings.system) + [{"role": "user", "content": message}]
        _, ids = engine.prompt(messages)
        max_tokens = engine.check_length(message, len(ids), int(settings.max_tokens))
    except InputTooLong as e:
        gr.Warning(str(e))
        yield (message, history, f"⚠️ {e}", *_unchanged())  # the message stays in the box, nothing is sent
        return
    except Exception as e:  # a template or tokenizer failure: say so, keep running
        yield (message, history, f"⚠️ Could not build the prompt: {type(e).__name__}: {e}", *_unchanged())
        return

    session.stop.clear()
    history.append({"role": "user", "content": message})
    thinking = {"role": "assistant", "content": "", "metadata": {"title": THINKING, "status": "pending"}}
    answer = {"role": "assistant", "content": ""}
    history += [thinking, answer]
    note = f" (max tokens lowered to {max_tokens} to fit the {engine.context}-token context)" if max_tokens < int(settings.max_tokens) else ""
    yield ("", _visible(history), "Generating…" + note, *_unchanged())

    start, thought_s, last_push, result, stopped = now(), None, 0.0, None, False
    stream = engine.stream(session, ids, settings, max_tokens)
    try:
        for chunk in stream:
            if chunk.reasoning:
                thinking["content"] += chunk.reasoning
            if chunk.answer:
                if thought_s is None:
                    thought_s = now() - start
                    thinking["metadata"] = {"title": THINKING, "status": "done", "duration": round(thought_s, 2)}
                answer["content"] += chunk.answer
            if chunk.result is not None:
                result = chunk.result
                break
            if session.stop.is_set():
                stopped = True
                break
            if now() - last_push >= STREAM_EVERY_S:
                last_push = now()
                yield ("", _visible(history), "Generating…" + note, *_unchanged())
    except Exception as e:  # shown in the chat; the app keeps running
        stream.close()
        _finish(history, thinking, answer, thought_s, start)
        history.append({"role": "assistant", "content": f"{type(e).__name__}: {e}",
                        "metadata": {"title": "⚠️ Error while generating", "status": "done"}})
        gr.Warning(f"Generation failed: {type(e).__name__}: {e}")
        yield ("", _visible(history), f"⚠️ Generation failed: {type(e).__name__}: {e}", *_unchanged())
        return
    finally:
        stream.close()
    _finish(history, thinking, answer, thought_s, start)
    if stopped or result is None:
        if not answer["content"]:
            answer["content"] = "*(stopped)*"
            history[:] = [m for m in history if m is not answer] + [answer]
        yield ("", _visible(history), "Stopped.", *_unchanged())
        return
    session.result, session.trace = result, result.expert_trace
    session.token_texts = engine.token_texts(result.tokens)
    if not result.answer and result.reasoning:
        answer["content"] = "*(no answer: the reasoning did not finish within max tokens)*"
    stats = views.stats_line(result, session.reused, thinking["metadata"].get("duration") if result.reasoning else None)
    yield ("", _visible(history), stats, *expert_views(engine, session))


def _finish(history: list, thinking: dict, answer: dict, thought_s: Optional[float], start: float) -> None:
    """Close the Thinking block (done, with its duration); drop it when the model wrote no reasoning."""
    if thinking["metadata"].get("status") != "done":
        thinking["metadata"] = {"title": THINKING, "status": "done", "duration": round(now() - start, 2)}
    if not thinking["content"].strip() and thinking in history:
        history.remove(thinking)


def _visible(history: list) -> list:
    """A snapshot of the chatbot's messages (copies: the live ones keep changing), without an answer bubble
    that is still empty."""
    return [{**m, **({"metadata": dict(m["metadata"])} if m.get("metadata") else {})}
            for m in history if m.get("metadata") or message_text(m.get("content"))]


def regenerate(engine: Engine, session: Session, history: list, settings: Settings) -> Iterator[tuple]:
    """Answer the last user message again (its earlier answer and reasoning are dropped)."""
    history = list(history or [])
    last_user = max((i for i, m in enumerate(history) if m.get("role") == "user"), default=None)
    if last_user is None:
        yield ("", history, "Nothing to regenerate yet.", *_unchanged())
        return
    message = message_text(history[last_user].get("content"))
    for out in respond(engine, session, message, history[:last_user], settings):
        yield ("",) + out[1:]


def stop(session: Session) -> None:
    session.stop.set()


def clear(engine: Engine, session: Session) -> tuple:
    """A new conversation: (textbox, chatbot, stats, heatmap, load, token slider, token view)."""
    session.stop.set()
    session.reset()
    return ("", [], "", *expert_views(engine, session))


def token_view(engine: Engine, session: Session, index) -> str:
    return views.token_view_html(session.trace, session.token_texts, int(index or 0), engine.n_shared)


def switch_model(engine: Engine, session: Session, choice: str, folder: str) -> tuple:
    """Load the typed folder (or hub id), else the chosen entry. Returns (model card, status, mtp checkbox,
    textbox, chatbot, stats, heatmap, load, token slider, token view); on failure the old model stays."""
    target = (folder or "").strip() or dict(local_models()).get(choice) or choice
    try:
        engine.load(None if target in (None, "", BUNDLED_LABEL) else target)
    except Exception as e:
        gr.Warning(f"Could not load {target}: {e}")
        return (gr.skip(), f"⚠️ Could not load {target}: {type(e).__name__}: {e}", gr.skip(), *([gr.skip()] * 7))
    session.stop.set()
    session.reset()
    mtp = gr.Checkbox(value=engine.mtp_pays, interactive=engine.has_mtp)
    return (views.model_html(engine.info), f"Loaded {engine.folder}.", mtp, "", [], "", *expert_views(engine, session))


# ---- the Blocks ---------------------------------------------------------------------------------------
CSS = """
#mlxds-stats { font-size: 13px; color: var(--body-text-color-subdued); }
"""


def build_app(engine: Engine) -> gr.Blocks:
    with gr.Blocks(title="mlx-deepseek chat", analytics_enabled=False) as demo:
        session = gr.State(Session)
        gr.Markdown("## mlx-deepseek chat\nThe model's reasoning streams into the collapsible **Thinking** block; "
                    "the answer follows below it. Under the chat: which experts the answer used.")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="chat", height=460, elem_id="mlxds-chat", layout="bubble",
                                     feedback_options=None, placeholder="Ask something, e.g. *What is 347 + 285?*")
                msg = gr.Textbox(placeholder="Your message (Enter to send)", show_label=False, elem_id="mlxds-input",
                                 max_lines=8, max_length=20_000)
                with gr.Row():
                    send_btn = gr.Button("Send", variant="primary", elem_id="mlxds-send")
                    stop_btn = gr.Button("Stop", elem_id="mlxds-stop")
                    regen_btn = gr.Button("Regenerate", elem_id="mlxds-regen")
                    clear_btn = gr.Button("Clear", elem_id="mlxds-clear")
                stats = gr.Markdown("", elem_id="mlxds-stats")
                gr.Examples(EXAMPLES, inputs=msg, label="examples")
            with gr.Column(scale=1, min_width=260):
                with gr.Accordion("Settings", open=True):
                    system = gr.Textbox(label="system prompt", lines=2, placeholder="(none)")
                    temperature = gr.Slider(0.0, 2.0, value=0.6, step=0.05, label="temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p")
                    max_tokens = gr.Slider(16, engine.context, value=min(512, engine.context), step=16, label="max tokens")
                    seed = gr.Number(value=-1, precision=0, label="seed (-1: random)")
                    mtp = gr.Checkbox(value=engine.mtp_pays, interactive=engine.has_mtp, elem_id="mlxds-mtp",
                                      label="MTP speculative decoding (same outputs, fewer steps; pays on a GPU)")
                with gr.Accordion("Model", open=False):
                    choice = gr.Dropdown([label for label, _ in local_models()], value=BUNDLED_LABEL,
                                         label="bundled model or hub-cache entry", allow_custom_value=True)
                    folder = gr.Textbox(label="or a local model folder", placeholder="/path/to/converted-model")
                    load_btn = gr.Button("Load")
                    model_status = gr.Markdown("")
                    model_card = gr.HTML(views.model_html(engine.info))
        with gr.Accordion("Expert activations of the last answer", open=True):
            with gr.Tabs():
                with gr.Tab("Heatmap"):
                    heatmap = gr.HTML(views.EMPTY, elem_id="mlxds-heatmap-box")
                with gr.Tab("Per token"):
                    token = gr.Slider(0, 1, value=0, step=1, label="token", interactive=False)
                    token_html = gr.HTML(views.EMPTY)
                with gr.Tab("Load balance"):
                    load_html = gr.HTML(views.EMPTY)

        settings_in = [system, temperature, top_p, max_tokens, seed, mtp]
        outputs = [msg, chatbot, stats, heatmap, load_html, token, token_html]

        def _settings(system, temperature, top_p, max_tokens, seed, mtp) -> Settings:
            seed = None if seed is None or int(seed) < 0 else int(seed)
            return Settings(system or "", temperature, top_p, int(max_tokens), seed, bool(mtp))

        def on_send(message, history, sess, *s):
            yield from respond(engine, sess, message, history, _settings(*s))

        def on_regen(history, sess, *s):
            yield from regenerate(engine, sess, history, _settings(*s))

        # One generation at a time, app-wide: every event that runs the model shares one concurrency id.
        gen = dict(concurrency_id="model", concurrency_limit=1, show_progress="hidden")
        sent = msg.submit(on_send, [msg, chatbot, session, *settings_in], outputs, **gen)
        clicked = send_btn.click(on_send, [msg, chatbot, session, *settings_in], outputs, **gen)
        regen = regen_btn.click(on_regen, [chatbot, session, *settings_in], outputs, **gen)
        stop_btn.click(stop, [session], None, concurrency_limit=None, show_progress="hidden")
        clear_btn.click(lambda s: clear(engine, s), [session], outputs, cancels=[sent, clicked, regen],
                        concurrency_limit=None)
        token.change(lambda s, i: token_view(engine, s, i), [session, token], token_html, concurrency_limit=None,
                     show_progress="hidden")
        load_btn.click(lambda s, c, f: switch_model(engine, s, c, f), [session, choice, folder],
                       [model_card, model_status, mtp, *outputs], cancels=[sent, clicked, regen], **gen)
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def theme() -> gr.themes.Base:
    """Gradio's default look with system fonts: nothing is fetched from a font CDN, the page works offline."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 7860, open_browser: bool = False, share: bool = False,
          block: bool = True):
    """Serve the app for a loaded engine. Returns (demo, local url); with block=False it runs in the background
    (close it with demo.close())."""
    demo = build_app(engine)
    _, url, share_url = demo.launch(
        server_name=host, server_port=port, inbrowser=open_browser, share=share, prevent_thread_lock=True,
        theme=theme(), css=CSS, footer_links=[], ssr_mode=False, mcp_server=False, show_error=True, quiet=True,
    )
    print(f"mlx-deepseek chat: {url}" + (f" (public link: {share_url})" if share_url else " (this machine only; --share for a public link)"),
          flush=True)
    if block:
        try:
            demo.block_thread()  # until Ctrl-C
        finally:
            demo.close()
    return demo, url


def launch(model: Optional[str] = None, host: str = "127.0.0.1", port: int = 7860, open_browser: bool = True,
           share: bool = False, block: bool = True, expert_memory=None, offload: Optional[dict] = None):
    """`mlx-deepseek chat`: load the model (None: the bundled one) and serve the app (`expert_memory`,
    `offload`: offload the routed experts of every MoE model it loads; see mlx_deepseek.load)."""
    print(f"loading {model or 'the bundled nano-r1'} ...", flush=True)
    return serve(Engine(model, expert_memory, offload), host, port, open_browser, share, block)
