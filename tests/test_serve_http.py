"""The OpenAI-compatible HTTP server: the official `openai` client against one uvicorn server (demo model) on
a free localhost port; stream == non-stream; /v1/completions == generate(); bad requests get OpenAI error
bodies and leak no pages; a client that hangs up mid-stream frees its pages. Plus the streamed reply reader
against parse_output on hand-written replies (no model)."""

import json
import random
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn
from starlette.testclient import TestClient

from kimi_jax.chat import render_chat
from kimi_jax.demo import demo_model
from kimi_jax.generate import generate
from kimi_jax.serve.engine import Engine, EngineConfig, Request, wait_idle
from kimi_jax.serve.reply import ReplyStream, read_reply
from kimi_jax.serve.server import create_app
from kimi_jax.tokenizer import ByteTokenizer

KEY = "test-key"
MODEL = "kimi-jax-demo"
# The shapes of tests/test_serve_engine.py's engine, so that in one pytest run its compiled programs serve here too
# (compiles are most of this file's time); for the same reason generate() runs with its max_new_tokens (10).
CONFIG = EngineConfig(max_batch=8, page_size=8, max_context=128, num_pages=48, prefill_chunk=16, batch_buckets=(8,))
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server():
    model, tokenizer = demo_model()
    engine = Engine(model, tokenizer, CONFIG)
    app = create_app(engine, model_name=MODEL, api_key=KEY)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    handles = SimpleNamespace(url=url, engine=engine, model=model, tokenizer=tokenizer,
                              client=openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0),
                              http=httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300))
    yield handles
    handles.client.close()
    handles.http.close()
    uv.should_exit = True
    thread.join(timeout=30)
    sock.close()


def assert_pages_back(engine):
    wait_idle(engine)
    assert sorted(engine.free_pages) == list(range(CONFIG.total_pages))


def test_chat_completion_streamed_equals_whole(server):
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    whole = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    prompt = render_chat(messages, server.tokenizer)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == MODEL and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(prompt) and 0 < whole.usage.completion_tokens <= 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    reasoning = choice.message.model_extra.get("reasoning_content")
    # Thinking is on, so the reply continues the prompt's <think>: reasoning then content are the raw completion
    # of the rendered prompt (its text skips special tokens such as </think>).
    raw = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert (reasoning or "") + choice.message.content == raw.choices[0].text and reasoning

    chunks = list(server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == choice.message.content
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == (reasoning or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    off = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                extra_body={"chat_template_kwargs": {"thinking": False}})
    assert off.usage.prompt_tokens == len(render_chat(messages, server.tokenizer, thinking=False))
    assert off.choices[0].message.model_extra.get("reasoning_content") is None and off.choices[0].message.content
    assert_pages_back(server.engine)


def test_completions_equal_generate(server):
    tok = server.tokenizer
    prompt = tok.encode("import os\n")
    expected = generate(server.model, [prompt], max_new_tokens=MAX_TOKENS, stop_ids=tok.stop_ids).tokens[0]
    by_ids = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert by_ids.choices[0].text == tok.decode(expected, skip_special=True)
    assert by_ids.usage.completion_tokens == len(expected) and by_ids.usage.prompt_tokens == len(prompt)
    assert by_ids.choices[0].finish_reason == ("stop" if expected[-1] in tok.stop_ids else "length")

    chunks = list(server.client.completions.create(model=MODEL, prompt="import os\n", max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == by_ids.choices[0].text
    assert chunks[-1].usage.completion_tokens == len(expected)

    # A stop string: the text ends before it (the engine's text, the same greedy tokens up to there).
    stop = by_ids.choices[0].text[5:8]
    stopped = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                               stop=[stop])
    text = stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop" and text == by_ids.choices[0].text[:len(text)]
    assert stop not in text and stop in by_ids.choices[0].text[len(text):len(text) + len(stop)]

    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_get_openai_errors_and_leak_nothing(server):
    http, chat = server.http, "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    assert error_of(http.post(chat, content=b"{not json", headers={"Content-Type": "application/json"}),
                    400)["type"] == "invalid_request_error"
    assert error_of(http.post(chat, json=[1, 2]), 400)["message"].startswith("the request body must be a JSON object")
    assert error_of(http.post(chat, json={"model": "gpt-4", "messages": hi}), 404)["code"] == "model_not_found"
    assert error_of(http.post(chat, json={"model": MODEL}), 400)["param"] == "messages"
    assert error_of(http.post(chat, json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
                    400)["param"] == "messages"
    too_long = error_of(http.post(chat, json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 200}]}),
                        400)
    assert too_long["code"] == "context_length_exceeded" and too_long["param"] == "messages"
    assert error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": [65] * 200}),
                    400)["param"] == "prompt"
    for field, value in [("temperature", -1), ("top_p", 0), ("top_k", -3), ("n", 2), ("max_tokens", 0),
                         ("max_completion_tokens", "ten"), ("stop", [""]), ("stop", 7), ("logprobs", True),
                         ("stream", "yes")]:
        error = error_of(http.post(chat, json={"model": MODEL, "messages": hi, field: value}), 400)
        assert error["param"] == field and error["message"].startswith(field), (field, error)
    assert error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 99999]}), 400)["param"] == "prompt"
    assert error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": {"a": 1}}), 400)["param"] == "prompt"
    assert error_of(http.get("/v1/nowhere"), 404)["code"] == "not_found"
    assert error_of(http.get(chat), 405)

    # API key: missing or wrong -> 401 on every /v1 route (the official client raises AuthenticationError).
    assert error_of(httpx.post(f"{server.url}{chat}", json={"model": MODEL, "messages": hi}),
                    401)["code"] == "invalid_api_key"
    assert error_of(httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()

    assert_pages_back(server.engine)
    ok = http.post(chat, json={"model": MODEL, "messages": hi, "max_tokens": 2, "temperature": 0.7, "top_k": 5,
                               "seed": 2**40 + 3, "stop": ["<|im_end|>", "\n\n"]})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
    assert_pages_back(server.engine)


def test_full_queue_answers_429(server):
    # An engine that is never started (nothing compiles) with room for one waiting request, already taken.
    engine = Engine(server.model, server.tokenizer, EngineConfig(max_batch=1, page_size=8, max_context=16, max_queue=1))
    engine.submit(Request((65,), max_tokens=1))
    client = TestClient(create_app(engine, model_name=MODEL, manage_engine=False))  # no API key here
    response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert error_of(response, 429)["code"] == "rate_limit_exceeded" and engine.waiting == 1
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL


@pytest.mark.parametrize("stream", [True, False])
def test_client_hanging_up_cancels_the_request(server, stream):
    engine, steps = server.engine, server.engine.steps
    body = {"model": MODEL, "prompt": "def main():\n", "temperature": 0, "stream": stream}  # 116 tokens: to the limit
    if stream:  # hang up after the first chunk
        with server.http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["choices"][0]["text"] is not None
    else:  # hang up while the whole answer is being generated
        payload = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + KEY.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
            deadline = time.monotonic() + 60
            while engine.active == 0:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.005)
    assert_pages_back(engine)
    assert engine.steps - steps < 100, "the request ran on after its client hung up"
    again = server.client.completions.create(model=MODEL, prompt="x = ", max_tokens=3, temperature=0)
    assert again.usage.completion_tokens == 3
    assert_pages_back(engine)


# ------------------------------------------------------------------------------- streamed reply == parse_output

def _replies():
    tok = ByteTokenizer()
    s, t = tok.special_ids, tok.encode

    def call(name, index, arguments):
        return [s["<|tool_call_begin|>"], *t(f"functions.{name}:{index}"), s["<|tool_call_argument_begin|>"],
                *t(arguments), s["<|tool_call_end|>"]]

    on = render_chat([{"role": "user", "content": "q"}], tok)
    off = render_chat([{"role": "user", "content": "q"}], tok, thinking=False)
    section = [s["<|tool_calls_section_begin|>"], *call("get", 0, '{"city": "Paris"}'), *t(" "),
               *call("put", 1, '{"x": [1, 2]}'), s["<|tool_calls_section_end|>"]]
    return tok, {
        "reasoning and content": (on, t("let me think é😀") + [s["</think>"]] + t("The answer is 4.")
                                  + [s["<|im_end|>"]]),
        "cut off while thinking": (on, t("still thinking about it")),
        "thinking off": (off, t("a plain answer") + [s["[BOS]"]] + t("is 4") + [s["<|im_end|>"]]),
        "tool calls": (on, t("plan") + [s["</think>"]] + t("Calling.") + section + t(" after") + [s["<|im_end|>"]]),
        "malformed call": (on, t("r") + [s["</think>"]] + t("c") + [s["<|tool_calls_section_begin|>"]]
                           + call("get", 0, "{bad json") + [s["<|tool_calls_section_end|>"], s["<|im_end|>"]]),
        "section never closed": (on, t("r") + [s["</think>"]] + [s["<|tool_calls_section_begin|>"]]
                                 + call("get", 0, "{}") + t(" ")),
    }


@pytest.mark.parametrize("stop", [None, "is", "4", "Paris"])
@pytest.mark.parametrize("name", list(_replies()[1]))
def test_streamed_reply_equals_whole_reply(name, stop):
    tok, replies = _replies()
    prompt, ids = replies[name]
    # The engine's text: specials skipped, cut where a stop string appears (the token that completed it stays).
    decoder, text = tok.incremental_decoder(skip_special=True), ""
    for n, token_id in enumerate(ids, 1):
        text += decoder.feed(token_id)
        if stop and stop in text:
            ids, text = ids[:n], text[:text.index(stop)]
            break
    whole = read_reply(prompt, ids, text, tok, tok.stop_ids)
    stream, deltas, released, rng = ReplyStream(prompt, tok, tok.stop_ids), [], 0, random.Random(0)
    for n, token_id in enumerate(ids):  # one token per event; the text arrives late and in uneven pieces
        piece = text[released:] if n == len(ids) - 1 else text[released:released + rng.randint(0, 3)]
        released += len(piece)
        deltas += stream.feed([token_id], piece)
    deltas += stream.finish()
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas) or None
    calls = [{k: v for k, v in d["tool_calls"][0].items() if k != "index"} for d in deltas if "tool_calls" in d]
    assert (reasoning, "".join(d.get("content", "") for d in deltas), calls) == \
        (whole.reasoning, whole.content, whole.tool_calls)
    assert [d["tool_calls"][0]["index"] for d in deltas if "tool_calls" in d] == list(range(len(calls)))
    if name == "tool calls" and stop in (None, "4"):
        assert [c["function"]["name"] for c in whole.tool_calls] == ["get", "put"] and whole.content == "Calling. after"
        assert json.loads(whole.tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}
    if name == "malformed call":
        assert whole.parse_error and "{bad json" in whole.content and whole.reasoning == "r"
