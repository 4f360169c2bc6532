"""`cai serve` under load and under abuse: many clients, clients that leave, bad requests, keys, bad CLI values.

Loopback only, on the tiny model (or the fake backend); every test is bounded in requests and seconds.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cai.backends.fake import FakeBackend
from cai.serve.server import serve_app
from cai.types import SamplingParams

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "How do I bake bread at home?"}]


def test_32_concurrent_clients_are_answered_in_shared_batches(server, served_backend):
    prompts = [f"Question {i}: how do I look after a {animal}?" for i, animal in
               enumerate(["cat", "dog", "horse", "fish", "parrot", "rabbit", "snake", "goat"])]
    before = server.engine.batcher.stats.calls, server.engine.batcher.stats.requests

    def client_session(client_id: int) -> list[tuple[str, str, str]]:
        answers = []
        with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120) as client:
            for k in range(4):
                prompt = prompts[(client_id + k) % len(prompts)]
                reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=4, temperature=0)
                answers.append((prompt, reply.choices[0].message.content, reply.choices[0].finish_reason))
        return answers

    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        answers = [a for session in pool.map(client_session, range(32)) for a in session]
    elapsed = time.monotonic() - start
    calls = server.engine.batcher.stats.calls - before[0]
    requests = server.engine.batcher.stats.requests - before[1]
    mean_batch = requests / calls
    print(f"128 requests from 32 clients in {elapsed:.1f} s; {calls} generate calls, mean batch {mean_batch:.1f}")

    assert len(answers) == requests == 128
    assert all(finish in ("stop", "length") and isinstance(text, str) for _, text, finish in answers)
    by_prompt: dict[str, set[str]] = {}
    for prompt, text, _ in answers:
        by_prompt.setdefault(prompt, set()).add(text)
    # Greedy answers don't depend on which requests shared a batch, and equal the backend's own.
    direct = served_backend.generate([[{"role": "user", "content": p}] for p in prompts],
                                     SamplingParams(max_new_tokens=4))
    assert by_prompt == {p: {text} for p, text in zip(prompts, direct)}
    assert any(text for _, text, _ in answers)
    assert mean_batch > 1, "concurrent requests were never batched"


def test_a_client_that_leaves_mid_stream_stops_its_decoding(server, served_backend, monkeypatch):
    monkeypatch.setattr(served_backend, "eos_ids", set())  # the stream could only end at max_tokens
    runner = server.engine.runner
    before = runner.decode_steps
    with httpx.Client(timeout=30) as client:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 4000, "temperature": 0, "stream": True}
        with client.stream("POST", server.url + "/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
                if len(events) == 3:
                    break  # leaving the block closes the connection mid-stream
    assert all(e["choices"][0]["finish_reason"] is None for e in events)
    time.sleep(0.5)
    stopped_at = runner.decode_steps
    time.sleep(0.5)
    assert runner.decode_steps == stopped_at < before + 200, "the engine kept decoding for a client that left"
    with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30) as client:
        reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4


BAD_REQUESTS = [
    # (what is wrong, path, raw body, status, words the one-sentence message must hold)
    ("malformed JSON", "/chat/completions", b'{"messages": [', 400, "not valid JSON"),
    ("not an object", "/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("messages not a list", "/chat/completions", {"messages": "hi"}, 400, "`messages`"),
    ("empty messages", "/chat/completions", {"messages": []}, 400, "`messages`"),
    ("no messages", "/chat/completions", {"model": "tiny"}, 400, "`messages` is required"),
    ("unknown role", "/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("max_tokens a string", "/chat/completions", {"messages": CHAT, "max_tokens": "ten"}, 400, "`max_tokens`"),
    ("temperature negative", "/chat/completions", {"messages": CHAT, "temperature": -1}, 400, "`temperature`"),
    ("stop a number", "/chat/completions", {"messages": CHAT, "stop": 5}, 400, "`stop`"),
    ("seed a string", "/chat/completions", {"messages": CHAT, "seed": "x"}, 400, "`seed`"),
    ("top_logprobs too many", "/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 99}, 400,
     "`top_logprobs`"),
    ("n > 1", "/chat/completions", {"messages": CHAT, "n": 2}, 400, "n=1"),
    ("unknown model", "/chat/completions", {"model": "gpt-9", "messages": CHAT}, 404, "gpt-9"),
    ("beyond the context", "/chat/completions", {"messages": CHAT, "max_tokens": 100_000}, 400, "context"),
    ("beyond the context, token by token", "/chat/completions",
     {"messages": CHAT, "max_tokens": 100_000, "stream": True}, 400, "context"),
    ("empty prompt", "/completions", {"prompt": ""}, 400, "`prompt`"),
    ("several prompts", "/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("token id out of range", "/completions", {"prompt": [1, 10**9]}, 400, "token ids"),
    ("max_tokens=0 without echo", "/completions", {"prompt": "hi", "max_tokens": 0}, 400, "echo"),
]


@pytest.mark.parametrize("what, path, body, status, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_one_openai_shaped_sentence(server, what, path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words in error["message"] and "\n" not in error["message"] and len(error["message"]) < 300
    ok = httpx.post(server.url + "/chat/completions", json={"messages": CHAT, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"]


def test_unknown_fields_are_ignored_as_openai_servers_do(server):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "temperature": 0, "user": "someone",
            "presence_penalty": 0.5, "continue_final_message": False, "add_generation_prompt": True,
            "response_format": {"type": "text"}, "top_k": -1}
    answer = httpx.post(server.url + "/chat/completions", json=body)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_is_read_whatever_its_content_type(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"messages": CHAT, "max_tokens": 2}).encode()  # what `curl -d` sends, without -H
    answer = httpx.post(server.url + "/chat/completions", content=body, headers=headers)
    assert answer.request.headers.get("Content-Type") == content_type
    assert answer.status_code == 200, answer.text


def test_oversized_bodies_get_413_and_the_server_keeps_serving():
    fake = FakeBackend()
    with serve_app(fake, "fake", port=0, max_body_bytes=4096).start() as srv, httpx.Client(timeout=10) as client:
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        sized = client.post(srv.url + "/chat/completions", json=big)
        chunked = client.post(srv.url + "/chat/completions", content=iter([b"x" * 3000, b"x" * 3000]))
        for answer in (sized, chunked):
            assert answer.status_code == 413 and "4096 bytes" in answer.json()["error"]["message"]
        small = client.post(srv.url + "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                            headers={"Transfer-Encoding": "chunked"})
        assert small.status_code == 200 and small.json()["choices"][0]["message"]["content"]
    assert [c for c in fake.calls if c[0] == "generate"] and "x" * 5000 not in str(fake.calls)


def test_a_missing_or_wrong_key_gets_401_and_no_key_is_logged(caplog):
    key, wrong = "sk-serve-KEY-7f3a9c", "sk-serve-WRONG-1b2c"
    caplog.set_level(logging.DEBUG)
    with serve_app(FakeBackend(), "fake", port=0, api_key=key, access_log=True).start() as srv:
        assert httpx.get(srv.url.removesuffix("/v1") + "/health").status_code == 200  # open, as in vLLM
        no_key = httpx.post(srv.url + "/chat/completions", json={"messages": CHAT})
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=srv.url, api_key=wrong, max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(model="fake", messages=CHAT)
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        with openai.OpenAI(base_url=srv.url, api_key=key, max_retries=0) as client:
            assert client.chat.completions.create(model="fake", messages=CHAT).choices[0].message.content
    logged = caplog.text
    assert "401" in logged and "/v1/chat/completions" in logged  # the access log and the refusals were captured
    for secret in (key, wrong, key[3:], wrong[3:]):
        assert secret not in logged


def test_key_is_compared_as_a_whole():
    with serve_app(FakeBackend(), "fake", port=0, api_key="abc").start() as srv:
        for header in ("Bearer ab", "Bearer abcd", "bearer abc", "abc", "Bearer  abc"):
            assert httpx.get(srv.url + "/models", headers={"Authorization": header}).status_code == 401
        assert httpx.get(srv.url + "/models", headers={"Authorization": "Bearer abc"}).status_code == 200


# ------------------------------------------------------------------------------ the CLI

@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    from cai.backends.hf import HFBackend

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad value was reported")

    monkeypatch.setattr(HFBackend, "from_spec", refuse)


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_out_of_range_before_loading(cai_cli, no_model_loads, port):
    code, _, err = cai_cli("serve", "bundled", "--port", port)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error:") and "65535" in lines[0] and port in lines[0]


def test_serve_on_a_port_in_use_is_one_sentence(cai_cli, no_model_loads):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cai_cli("serve", "bundled", "--port", port)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert f"127.0.0.1:{port}" in lines[0] and "already in use" in lines[0]


def test_serve_with_an_unset_key_variable_is_one_sentence(cai_cli, monkeypatch, no_model_loads):
    monkeypatch.delenv("CAI_NO_SUCH_KEY", raising=False)
    code, _, err = cai_cli("serve", "bundled", "--api-key-env", "CAI_NO_SUCH_KEY")
    assert code == 1 and "CAI_NO_SUCH_KEY" in err and "Traceback" not in err


def test_serve_stops_cleanly_in_a_thread_while_a_stream_is_open(served_backend, monkeypatch):
    """stop() returns within the graceful timeout even with a client mid-stream."""
    monkeypatch.setattr(served_backend, "eos_ids", set())
    srv = serve_app(served_backend, "tiny", port=0).start()
    opened = threading.Event()

    def reader() -> None:
        try:
            with httpx.stream("POST", srv.url + "/chat/completions", timeout=30,
                              json={"messages": CHAT, "max_tokens": 3000, "stream": True}) as response:
                for _ in response.iter_lines():
                    opened.set()
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert opened.wait(20)
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 12
    thread.join(10)
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url.removesuffix("/v1") + "/health", timeout=2)
