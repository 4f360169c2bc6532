"""The OpenAI-compatible server over a tiny model, driven by the official `openai` client."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from cai.backends.fake import FakeBackend
from cai.serve.server import serve_app
from cai.types import SamplingParams

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "How do I bake bread at home?"}]
PROMPT = "Which of these responses is less harmful? The answer is:"


@pytest.fixture()
def backend(served_backend):
    return served_backend


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def test_health_and_models(server, client):
    assert httpx.get(server.url.removesuffix("/v1") + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert server.url.startswith("http://127.0.0.1:")


def test_chat_completion_is_the_backends_greedy_output(backend, client):
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == backend.generate([CHAT], SamplingParams(max_new_tokens=10))[0]
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == backend.count_tokens(CHAT)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_final_assistant_message_is_continued(backend, client):
    chat = [*CHAT, {"role": "assistant", "content": "The answer is:"}]
    reply = client.chat.completions.create(model="tiny", messages=chat, max_tokens=6, temperature=0,
                                           extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert reply.choices[0].message.content == backend.generate([chat], SamplingParams(max_new_tokens=6))[0]


def test_streaming_gives_the_same_text_in_chunks(client):
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole.choices[0].message.content
    assert sum(1 for d in deltas if d) > 1  # really token by token
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_every_request_runs_the_model_on_the_batchers_thread(backend, client, monkeypatch):
    """Plain, streamed, log-prob and echo requests all run the model on one thread, the batcher's (a
    second thread running it while the first one's CPU thread team lived ran at ~60% speed)."""
    threads, real = set(), backend.model.forward

    def forward(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", forward)
    client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, temperature=0, stream=True))
    client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                   top_logprobs=2)
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0, echo=True, logprobs=1)
    assert threads == {"cai-serve-batcher"}


def test_seeded_sampling_is_reproducible_streamed_or_not(client):
    kwargs = dict(model="tiny", messages=CHAT, max_tokens=10, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    again = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True))
    other = client.chat.completions.create(**{**kwargs, "seed": 99}).choices[0].message.content
    assert first == again == streamed
    assert other != first


def test_stop_strings_cut_whole_and_streamed_output(client):
    full = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    at = next(i for i in range(2, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].strip())
    stop = text[at:at + 2]
    cut = text[: text.find(stop)]
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0, stop=[stop])
    streamed = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0, stop=stop,
                                              stream=True)
    assert whole.choices[0].message.content == cut
    assert whole.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut


def test_chat_logprobs_of_greedy_tokens(client):
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens > 0
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.logprob == pytest.approx(tops[0]) and e.logprob <= 0  # greedy picks the top token


def test_completions_echo_gives_prompt_logprobs(backend, client):
    option = " (A)"
    reply = client.completions.create(model="tiny", prompt=PROMPT + option, max_tokens=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == PROMPT + option
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == PROMPT + option
    assert lp.text_offset == sorted(lp.text_offset) and all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    option_sum = sum(v for v, o in zip(lp.token_logprobs, lp.text_offset) if o >= len(PROMPT))
    assert option_sum == pytest.approx(backend.choice_logprobs([PROMPT], [option])[0][0], abs=1e-4)


def test_completions_generate_after_echo(backend, client):
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=0)
    greedy = backend.generate([PROMPT], SamplingParams(max_new_tokens=4))[0]
    assert reply.choices[0].text == PROMPT + greedy
    n_prompt = len(backend.encode([PROMPT])[0])
    assert len(reply.choices[0].logprobs.tokens) == n_prompt + reply.usage.completion_tokens
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert plain.choices[0].text == greedy


def test_completions_take_token_ids(backend, client):
    ids = backend.encode([PROMPT])[0]
    reply = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    assert reply.choices[0].text == backend.generate([PROMPT], SamplingParams(max_new_tokens=3))[0]


def test_errors_are_openai_shaped(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=100_000, logprobs=True)
    bad = httpx.post(server.url + "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()["error"]) >= {"message", "type"}
    assert httpx.post(server.url + "/nowhere", json={}).status_code == 404
    assert httpx.get(server.url + "/nowhere").json()["error"]["type"] == "invalid_request_error"


def test_any_backend_is_served_and_concurrent_requests_share_batches():
    slow_once = threading.Event()

    def respond(text: str, seed: int) -> str:
        if "first" in text and not slow_once.is_set():
            slow_once.set()
            time.sleep(0.4)  # keep the model busy while the other requests queue up
        return "reply to " + text.split("\n")[1]

    fake = FakeBackend(respond=respond)
    with serve_app(fake, "fake", port=0).start() as srv, openai.OpenAI(base_url=srv.url, api_key="x") as client:
        def ask(word: str) -> str:
            chat = [{"role": "user", "content": word}]
            return client.chat.completions.create(model="fake", messages=chat, temperature=0).choices[0].message.content

        threads = [threading.Thread(target=lambda w=w: results.__setitem__(w, ask(w))) for w in
                   ["first", "a", "b", "c"]]
        results: dict[str, str] = {}
        threads[0].start()
        time.sleep(0.15)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
        with pytest.raises(openai.BadRequestError, match="log-probs"):
            client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], logprobs=True)
    assert results == {w: f"reply to {w}" for w in ["first", "a", "b", "c"]}
    assert len([c for c in fake.calls if c[0] == "generate"]) == 2  # "first", then a, b, c together


def test_api_key_is_required_when_set():
    with serve_app(FakeBackend(), "fake", port=0, api_key="s3cret").start() as srv:
        with openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        with openai.OpenAI(base_url=srv.url, api_key="s3cret") as client:
            assert [m.id for m in client.models.list()] == ["fake"]
