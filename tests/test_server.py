"""`mlx-deepseek serve`: the official openai client (and raw httpx) against a live server on loopback, serving the
bundled nano-r1 model."""

import json
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

KEY = "test-key"
MAX_TOKENS_LIMIT = 800
MAX_REQUEST_BYTES = 20_000
QUESTION = "What is 12 + 30?"


@pytest.fixture(scope="module")
def served():
    import uvicorn

    from app.server import ServerConfig, create_app
    from mlx_deepseek import load
    from mlx_deepseek.chat import apply_chat_template
    from mlx_deepseek.generate import generate

    model, tokenizer = load(None)
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": QUESTION}], model.args.model_type)
    # The reference answer, computed in-process before the server's worker owns the model (greedy: deterministic).
    expected = generate(model, tokenizer, prompt, max_tokens=200)
    assert expected.finish_reason == "stop" and expected.reasoning and expected.answer

    app = create_app(model, tokenizer, ServerConfig("nano-r1", KEY, MAX_TOKENS_LIMIT, MAX_REQUEST_BYTES))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    base = f"http://127.0.0.1:{port}/v1"
    yield {"base": base, "app": app, "tokenizer": tokenizer, "prompt": prompt, "expected": expected,
           "client": openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=60)}
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def ask(content=QUESTION):
    return [{"role": "user", "content": content}]


def test_models(served):
    models = served["client"].models.list()
    assert [m.id for m in models.data] == ["nano-r1"]


def test_chat(served):
    exp, tok = served["expected"], served["tokenizer"]
    r = served["client"].chat.completions.create(model="nano-r1", messages=ask(), max_tokens=200, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.reasoning_content == exp.reasoning and msg.content == exp.answer  # reasoning apart from the answer
    assert "</think>" not in msg.content and "</think>" not in msg.reasoning_content
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens == len(tok.encode(served["prompt"], add_special_tokens=False))
    assert u.completion_tokens == len(exp.tokens)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    reasoning = u.completion_tokens_details.reasoning_tokens
    assert reasoning == len(tok.encode(exp.reasoning, add_special_tokens=False))
    assert 0 < reasoning < u.completion_tokens


def test_chat_stream(served):
    exp = served["expected"]
    stream = served["client"].chat.completions.create(
        model="nano-r1", messages=ask(), max_tokens=200, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content, finish, usage, n = "", "", None, None, 0
    for chunk in stream:
        n += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert n > 10  # streamed, not one lump
    assert reasoning == exp.reasoning and content == exp.answer and finish == "stop"
    assert usage.completion_tokens == len(exp.tokens) and usage.prompt_tokens == exp.prompt_tokens
    assert usage.completion_tokens_details.reasoning_tokens > 0


def test_length_and_stop(served):
    exp, client = served["expected"], served["client"]
    r = client.chat.completions.create(model="nano-r1", messages=ask(), max_completion_tokens=7, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    word = "carry"
    assert word in exp.reasoning
    r = client.chat.completions.create(model="nano-r1", messages=ask(), max_tokens=200, temperature=0, stop=word)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.reasoning_content == exp.reasoning[: exp.reasoning.index(word)]
    assert r.usage.completion_tokens < len(exp.tokens)
    stream = client.chat.completions.create(model="nano-r1", messages=ask(), max_tokens=200, temperature=0,
                                            stop=["no such text", word], stream=True)
    text = "".join((getattr(c.choices[0].delta, "reasoning_content", None) or "") for c in stream if c.choices)
    assert text == exp.reasoning[: exp.reasoning.index(word)]


def test_completions_raw(served):
    client = served["client"]
    r = client.completions.create(model="nano-r1", prompt="Add the digits", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 and r.choices[0].text
    chunks = list(client.completions.create(model="nano-r1", prompt="Add the digits", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_conversation_reuses_the_prompt_cache(served):
    client, log = served["client"], served["app"].state.worker.log
    first = client.chat.completions.create(model="nano-r1", messages=ask("What is 5 + 6?"), max_tokens=200,
                                           temperature=0)
    turns = ask("What is 5 + 6?") + [{"role": "assistant", "content": first.choices[0].message.content},
                                     {"role": "user", "content": "What is 7 + 8?"}]
    second = client.chat.completions.create(model="nano-r1", messages=turns, max_tokens=20, temperature=0)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # everything up to the first turn's "<｜Assistant｜>" came from the cache
    assert log[-1]["reused"] >= first.usage.prompt_tokens - 2


def test_expert_trace(served):
    r = served["client"].chat.completions.create(model="nano-r1", messages=ask(), max_tokens=5, temperature=0,
                                                 extra_body={"expert_trace": True})
    trace = r.model_extra["expert_trace"]
    assert trace["layers"] and len(trace["experts"]) == r.usage.completion_tokens


def post(served, body, key=KEY, path="/chat/completions", raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(served["base"] + path, content=content, headers=headers, timeout=30)


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body", [
    {"model": "nano-r1"},                                             # no messages
    {"model": "nano-r1", "messages": "hi"},                           # wrong type
    {"model": "nano-r1", "messages": []},
    {"model": "nano-r1", "messages": [{"role": "user"}]},            # no content
    {"model": "nano-r1", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "nano-r1", "messages": [{"role": "user", "content": 5}]},
    {"model": "nano-r1", "messages": ask(), "temperature": "hot"},
    {"model": "nano-r1", "messages": ask(), "max_tokens": "many"},
    {"model": "nano-r1", "messages": ask(), "max_tokens": 0},
    {"model": "nano-r1", "messages": ask(), "max_tokens": True},
    {"model": "nano-r1", "messages": ask(), "stop": [1, 2]},
    {"model": "nano-r1", "messages": ask(), "stream": "yes"},
    {"model": "nano-r1", "messages": ask(), "n": 2},
    {"model": 3, "messages": ask()},
    [1, 2, 3],                                                        # not an object
])
def test_bad_requests_are_400(served, body):
    assert_openai_error(post(served, body), 400)


def test_limits_are_400(served):
    client = served["client"]
    with pytest.raises(openai.BadRequestError) as e:  # max_tokens over the server's limit
        client.chat.completions.create(model="nano-r1", messages=ask(), max_tokens=MAX_TOKENS_LIMIT + 1)
    assert e.value.body["param"] == "max_tokens"
    err = assert_openai_error(post(served, {"messages": ask("x" * MAX_REQUEST_BYTES)}), 400)  # body too large
    assert err["code"] == "request_too_large"
    err = assert_openai_error(post(served, {"messages": ask("1 + " * 1500)}), 400)  # over the model's context
    assert err["code"] == "context_length_exceeded"
    assert_openai_error(post(served, None, raw=b"{not json"), 400)
    assert_openai_error(post(served, {"prompt": 7}, path="/completions"), 400)
    assert_openai_error(post(served, {}, path="/completions"), 400)
    assert client.models.list().data  # still serving


def test_api_key(served):
    bad = openai.OpenAI(base_url=served["base"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="nano-r1", messages=ask(), max_tokens=5)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    err = assert_openai_error(post(served, {"messages": ask()}, key=None), 401)
    assert err["code"] == "invalid_api_key"
    assert_openai_error(httpx.get(served["base"] + "/models"), 401)


def test_disconnect_mid_stream_stops_generation(served, monkeypatch):
    # with no end-of-sequence id the generation can only end at max_tokens (seconds of work) or by cancellation
    monkeypatch.setattr(served["tokenizer"], "eos_token_ids", {-1})
    log = served["app"].state.worker.log
    body = {"model": "nano-r1", "prompt": "Add the digits", "max_tokens": 800, "temperature": 2.0, "top_p": 1.0,
            "seed": 0, "stream": True}
    n = len(log)
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", served["base"] + "/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            line = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(line[6:])["choices"][0]["text"] is not None
    for _ in range(100):  # the worker notices at its next token
        if len(log) > n:
            break
        time.sleep(0.05)
    assert log[-1]["cancelled"] and log[-1]["tokens"] < 800
    monkeypatch.undo()  # the end-of-sequence id back: the next request ends as usual
    r = served["client"].chat.completions.create(model="nano-r1", messages=ask(), max_tokens=200, temperature=0)
    assert r.choices[0].message.content == served["expected"].answer


def test_disconnect_while_waiting_for_a_plain_answer(served, monkeypatch):
    # with no end-of-sequence id the generation can only end at max_tokens (seconds of work) or by cancellation
    monkeypatch.setattr(served["tokenizer"], "eos_token_ids", {-1})
    log = served["app"].state.worker.log
    body = {"model": "nano-r1", "prompt": "Add the digits", "max_tokens": 800, "temperature": 2.0, "top_p": 1.0,
            "seed": 0}
    n = len(log)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(served["base"] + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=0.3))
    for _ in range(100):
        if len(log) > n:
            break
        time.sleep(0.05)
    assert log[-1]["cancelled"] and log[-1]["tokens"] < 800
    assert served["client"].models.list().data


def test_concurrent_streams(served):
    questions = ["What is 12 + 30?", "What is 4 + 9?", "What is 100 + 23?", "What is 12 + 30?"]
    results = [None] * len(questions)

    def run(i):
        client = openai.OpenAI(base_url=served["base"], api_key=KEY, max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="nano-r1", messages=ask(questions[i]), max_tokens=120,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                text += (getattr(c.delta, "reasoning_content", None) or "") + (c.delta.content or "")
                finish = c.finish_reason or finish
        results[i] = (text, finish, usage)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for text, finish, usage in results:
        assert text and finish in ("stop", "length") and usage.completion_tokens > 0
    assert results[0][0] == results[3][0]  # the same question, the same greedy answer


def test_cli_expert_memory_reaches_the_load(capsys):
    from mlx_deepseek.cli import main

    assert main(["serve", "--expert-memory", "1KB"]) == 2  # too small: refused before the server starts
    assert "offloading needs at least" in capsys.readouterr().err
