"""The HTTP backend against cai's own server (exactness) and against scripted stdlib servers (retries, keys)."""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cai.backends.base import Backend
from cai.backends.http_transport import backoff_delay, cache_key, parse_retry_after
from cai.backends.openai_http import OpenAIHTTPBackend, from_config
from cai.errors import CaiError, LogprobsUnavailable, NoChoiceInTopLogprobs
from cai.prompts import CHOICE_OPTIONS
from cai.types import SamplingParams

pytest.importorskip("httpx")

CHATS = [
    [{"role": "user", "content": "How do I bake bread at home?"}],
    [{"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "The answer is:"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Please rewrite the response"}],
]
CHOICE_PROMPTS = [
    "Which of these responses is less harmful? (A) bake bread (B) insult\nThe answer is:",
    "Human: 0 1 2 3\n\nAssistant: 4 5 6\n\nWhich response is more helpful?\nThe answer is:",
]


@pytest.fixture()
def hf(served_backend):
    return served_backend


def http_backend(urls, **kw) -> OpenAIHTTPBackend:
    kw.setdefault("backoff_s", 0.001)
    kw.setdefault("max_backoff_s", 0.002)
    return OpenAIHTTPBackend(urls if isinstance(urls, list) else [urls], kw.pop("model", "tiny"), **kw)


class Scripted:
    """A stdlib server on 127.0.0.1 answering from ``reply(n, path, body, headers)``; records every request."""

    def __init__(self, reply) -> None:
        self.requests: list[tuple[str, dict, dict]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                scripted.requests.append((self.path, dict(self.headers), body))
                status, headers, payload = reply(len(scripted.requests), self.path, body, self.headers)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (the timeout tests): nothing to answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def ok_text(text: str = "hello"):
    return 200, {}, {"choices": [{"index": 0, "text": text, "message": {"role": "assistant", "content": text}}],
                     "usage": {"completion_tokens": 1}}


# ------------------------------------------------------------------- against cai's own server

def test_generate_equals_the_hf_backends_greedy_output(hf, server):
    prompts = [*CHATS, "The quick brown fox"]
    params = SamplingParams(max_new_tokens=10)
    with http_backend(server.url, concurrency=3) as backend:
        assert isinstance(backend, Backend)
        finished = []
        got = backend.generate(prompts, params, progress=lambda rows, tokens: finished.append(rows))
    assert got == hf.generate(prompts, params)
    assert sum(finished) == len(prompts)


def test_completion_mode_renders_chats_locally(hf, server):
    params = SamplingParams(max_new_tokens=8)
    with http_backend(server.url, mode="completion", tokenizer=hf.tokenizer) as backend:
        assert [backend.render(c) for c in CHATS] == [hf.render(c) for c in CHATS]
        assert backend.count_tokens(CHATS[0]) == hf.count_tokens(CHATS[0])
        assert backend.generate(CHATS, params) == hf.generate(CHATS, params)


@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["token-ids", "text-offsets"])
def test_choice_logprobs_equal_the_hf_backends(hf, server, with_tokenizer):
    with http_backend(server.url, tokenizer=hf.tokenizer if with_tokenizer else None) as backend:
        got = backend.choice_logprobs(CHOICE_PROMPTS, list(CHOICE_OPTIONS))
    want = hf.choice_logprobs(CHOICE_PROMPTS, list(CHOICE_OPTIONS))
    assert sum(got, []) == pytest.approx(sum(want, []), abs=1e-4)


def test_chats_need_a_tokenizer_to_render(server):
    with http_backend(server.url) as backend:
        assert backend.has_chat_template and backend.context_length is None
        with pytest.raises(CaiError, match="tokenizer="):
            backend.render(CHATS[0])
        assert backend.count_tokens("abcdefgh") == 2  # the chars/4 estimate


def listed_tokens(backend: OpenAIHTTPBackend, chat) -> list[str]:
    """The server's top-20 next tokens after a chat whose last (assistant) message it continues."""
    body = {"model": "tiny", "messages": chat, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
            "top_logprobs": 20, "continue_final_message": True, "add_generation_prompt": False}
    return [e["token"] for e in backend.http.post("/chat/completions", body)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]


def two_readable_tokens(tokenizer, listed: list[str]) -> list[str]:
    """Two listed tokens that each read as one option: one token alone, and no other listed token starts
    like them (a random model lists byte fragments and near-duplicates such as "le" and " le")."""
    def alone(t: str) -> bool:
        key = t.strip()
        return (bool(key) and key.isprintable() and "<|" not in t
                and len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1
                and not any(u != t and u.strip() and (u.strip().startswith(key) or key.startswith(u.strip())) for u in listed))

    usable = [t for t in listed if alone(t)]
    a = usable[0]
    b = next(t for t in usable[1:] if t.strip()[0] != a.strip()[0])
    return [a, b]


@pytest.mark.parametrize("shared", ["", " ("], ids=["single-tokens", "shared-start"])
def test_chat_route_scores_equal_the_echo_route(hf, server, shared):
    """A chat scored on /chat/completions (server-side template, top-20) gives the log-probs that its locally
    rendered text gets on /completions with echo and token ids, for options that are one token after their shared start."""
    lead_in = CHATS[1][:-1] + [{"role": "assistant", "content": CHATS[1][-1]["content"] + shared}]
    with http_backend(server.url) as chat_backend, http_backend(server.url, tokenizer=hf.tokenizer) as echo_backend:
        assert chat_backend.scores_chats and not chat_backend.can_render_chats and echo_backend.can_render_chats
        tokens = two_readable_tokens(hf.tokenizer, listed_tokens(chat_backend, lead_in))
        got = chat_backend.choice_logprobs([CHATS[1]], [shared + t for t in tokens])
        want = echo_backend.choice_logprobs([hf.render(lead_in)], tokens)
        assert echo_backend._echo_ok
    assert got[0] == pytest.approx(want[0], abs=1e-4)


# ------------------------------------------------------------------- against scripted servers

def test_requests_go_round_robin_and_carry_the_sampling_settings():
    with Scripted(lambda *a: ok_text()) as one, Scripted(lambda *a: ok_text()) as two:
        with http_backend([one.url, two.url + "/"], concurrency=2) as backend:
            params = SamplingParams(max_new_tokens=5, temperature=0.7, top_k=40, stop=("\n",))
            assert backend.generate([*CHATS, "a", "b", "c"], params, seeds=list(range(6))) == ["hello"] * 6
    assert len(one.requests) == len(two.requests) == 3
    bodies = {b["seed"]: (path, b) for path, _, b in one.requests + two.requests}
    assert sorted(bodies) == list(range(6))
    path, chat = bodies[1]
    assert path == "/v1/chat/completions" and chat["continue_final_message"] and not chat["add_generation_prompt"]
    assert (chat["max_tokens"], chat["temperature"], chat["top_k"], chat["stop"]) == (5, 0.7, 40, ["\n"])
    assert bodies[0][1].get("continue_final_message") is None
    assert bodies[3][0] == "/v1/completions" and bodies[3][1]["prompt"] == "a"


def test_server_errors_are_retried_with_backoff():
    replies = iter([(503, {}, {"error": {"message": "busy"}}), (503, {}, {}), ok_text("done")])
    with Scripted(lambda *a: next(replies)) as srv:
        backend = http_backend(srv.url, max_retries=3)
        slept: list[float] = []
        backend.http.sleep = slept.append
        assert backend.generate(["x"], SamplingParams()) == ["done"]
    assert len(srv.requests) == 3 and len(slept) == 2


def test_retry_after_is_respected():
    replies = iter([(429, {"Retry-After": "3"}, {"error": {"message": "slow down"}}), ok_text("done")])
    with Scripted(lambda *a: next(replies)) as srv:
        backend = http_backend(srv.url)
        slept: list[float] = []
        backend.http.sleep = slept.append
        assert backend.generate(["x"], SamplingParams()) == ["done"]
    assert slept == [3.0]


def test_client_errors_fail_at_once_with_the_servers_message():
    with Scripted(lambda *a: (400, {}, {"error": {"message": "max_tokens is too large", "type": "x"}})) as srv:
        with pytest.raises(CaiError, match=r"HTTP 400: max_tokens is too large"):
            http_backend(srv.url).generate(["x"], SamplingParams())
    assert len(srv.requests) == 1


def test_a_down_server_fails_after_the_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(CaiError, match=rf"{url}/completions failed after 3 attempts; the last error was Connect"):
        http_backend(url, max_retries=2).generate(["x"], SamplingParams())


def test_timeouts_are_retried_then_reported():
    def slow(*a):
        time.sleep(0.5)
        return ok_text()

    with Scripted(slow) as srv:
        with pytest.raises(CaiError, match="failed after 2 attempts; the last error was ReadTimeout"):
            http_backend(srv.url, timeout_s=0.05, max_retries=1).generate(["x"], SamplingParams())


def test_api_key_comes_from_the_environment_and_stays_out_of_repr(monkeypatch):
    with Scripted(lambda *a: ok_text()) as srv:
        backend = http_backend(srv.url, api_key_env="CAI_TEST_KEY")
        monkeypatch.delenv("CAI_TEST_KEY", raising=False)
        backend.generate(["x"], SamplingParams())
        monkeypatch.setenv("CAI_TEST_KEY", "sk-very-secret")
        backend.generate(["x"], SamplingParams())
    assert "Authorization" not in srv.requests[0][1]
    assert srv.requests[1][1]["Authorization"] == "Bearer sk-very-secret"
    assert "sk-very-secret" not in repr(backend) and "CAI_TEST_KEY" in repr(backend)
    assert "sk-very-secret" not in str(vars(backend))


def test_without_echo_single_token_options_come_from_top_logprobs():
    def no_echo(n, path, body, headers):
        if body.get("echo"):
            return 400, {}, {"error": {"message": "echo is not supported"}}
        top = {"A": -0.25, "B": -1.5, "C": -9.0} if "second" in body["prompt"] else {"A": -2.0, "B": -0.2}
        return 200, {}, {"choices": [{"text": "A", "logprobs": {"tokens": ["A"], "token_logprobs": [-0.25],
                                                                 "top_logprobs": [top]}}]}

    with Scripted(no_echo) as srv:
        backend = http_backend(srv.url)
        assert backend.choice_logprobs(["first", "second"], ["A", "B"]) == [[-2.0, -0.2], [-0.25, -1.5]]
        with pytest.raises(CaiError, match="can't return the log-probs needed for labels"):
            backend.choice_logprobs(["first"], ["A", "C"])
    assert sum(1 for _, _, b in srv.requests if b.get("echo")) == 1  # learnt once, then skipped


def test_without_echo_multi_token_options_are_refused(hf):
    def no_echo(*a):
        return 400, {}, {"error": {"message": "echo is not supported"}}

    with Scripted(no_echo) as srv:
        with pytest.raises(CaiError, match="can't return the log-probs needed for labels.*more than one token"):
            http_backend(srv.url, tokenizer=hf.tokenizer).choice_logprobs(["p"], list(CHOICE_OPTIONS))


def chat_top(pairs):
    """A chat answer whose first token lists ``pairs`` (token, log-prob) as its top candidates."""
    content = [{"token": pairs[0][0], "logprob": pairs[0][1],
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in pairs]}] if pairs else []
    return 200, {}, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                  "logprobs": {"content": content}}], "usage": {"prompt_tokens": 30, "completion_tokens": 1}}


def judge_chat(tag: str):
    return [{"role": "user", "content": f"Which is better? {tag}"}, {"role": "assistant", "content": "The answer is:"}]


def test_chats_are_scored_on_the_chat_route_from_the_top_20():
    listed = {"one": [("A", -0.5), (" A", -2.0), ("B", -1.5), ("Q", -4.0)],  # " A" and "A" both start (A)
              "two": [("B", -0.1), ("Q", -3.0)],  # (A) unlisted: it gets the stand-in
              "three": [("Q", -0.1), ("R", -2.0)]}  # neither listed: an abstention

    def reply(n, path, body, headers):
        return chat_top(listed[body["messages"][0]["content"].split()[-1]])

    with Scripted(reply) as srv:
        backend = http_backend(srv.url, concurrency=3)
        assert backend.scores_chats and not backend.can_render_chats
        got = backend.choice_logprobs([judge_chat("one"), judge_chat("two")], list(CHOICE_OPTIONS))
        with pytest.raises(NoChoiceInTopLogprobs, match=r"^for 1 of 3 prompts \(rows 1\) none of the options") as err:
            backend.choice_logprobs([judge_chat("one"), judge_chat("three"), judge_chat("two")], list(CHOICE_OPTIONS))
    assert got[0] == pytest.approx([math.log(math.exp(-0.5) + math.exp(-2.0)), -1.5])
    assert got[1] == [-3.0 - math.log(2), -0.1]
    assert err.value.rows == [1] and err.value.scores == [got[0], [-math.inf, -math.inf], got[1]]
    path, _, body = srv.requests[0]
    assert path == "/v1/chat/completions"
    assert body["messages"][-1] == {"role": "assistant", "content": "The answer is: ("}  # the options' shared start
    assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (1, 0.0, True, 20)
    assert body["continue_final_message"] and not body["add_generation_prompt"] and "echo" not in body


def test_a_chat_without_an_assistant_lead_in_gets_one_holding_the_shared_start():
    with Scripted(lambda *a: chat_top([("A", -1.0), ("B", -2.0)])) as srv:
        got = http_backend(srv.url).choice_logprobs([CHATS[0]], list(CHOICE_OPTIONS))
    assert got == [[-1.0, -2.0]]
    assert srv.requests[0][2]["messages"] == [*CHATS[0], {"role": "assistant", "content": " ("}]


@pytest.mark.parametrize("logprobs", [None, {"content": []}, {"content": [{"token": "A", "logprob": -1.0, "top_logprobs": []}]}])
def test_a_chat_server_without_logprobs_says_so_in_one_sentence(logprobs):
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}, "logprobs": logprobs}]}
    with Scripted(lambda *a: (200, {}, answer)) as srv:
        with pytest.raises(LogprobsUnavailable) as err:
            http_backend(srv.url, model="gpt-judge").choice_logprobs([judge_chat("x")], list(CHOICE_OPTIONS))
    message = str(err.value)
    assert message.startswith(f"the server at {srv.url} answered /chat/completions with no log-probs")
    assert "'gpt-judge'" in message and "votes" in message and message.count(". ") == 0 and "\n" not in message


def test_a_completions_server_without_any_logprobs_says_so_too():
    def no_logprobs(n, path, body, headers):
        if body.get("echo"):
            return 400, {}, {"error": {"message": "echo is not supported"}}
        return ok_text("A")

    with Scripted(no_logprobs) as srv:
        with pytest.raises(LogprobsUnavailable, match="neither prompt log-probs"):
            http_backend(srv.url).choice_logprobs(["p"], ["A", "B"])


def answer_by_request(n, path, body, headers):
    """Answers that depend only on the request, with token usage."""
    if path.endswith("/chat/completions"):
        return chat_top([("A", -1.0), ("B", -2.0)])
    return 200, {}, {"choices": [{"index": 0, "text": f"re {body['prompt']}"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def test_a_cached_rerun_sends_nothing_and_answers_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_TEST_KEY", "sk-cache-secret")
    params = SamplingParams(max_new_tokens=4)
    with Scripted(answer_by_request) as first:
        backend = http_backend(first.url, cache_dir=tmp_path, api_key_env="CAI_TEST_KEY")
        texts = backend.generate(["a", "b", "c"], params)
        scores = backend.choice_logprobs([judge_chat("one")], list(CHOICE_OPTIONS))
        assert backend.usage == {"requests": 4, "cache_hits": 0, "prompt_tokens": 3 * 3 + 30, "completion_tokens": 2 * 3 + 1}
    monkeypatch.setenv("CAI_TEST_KEY", "sk-another-key")  # neither the key nor the server's URL is part of the cache key
    with Scripted(answer_by_request) as second:
        again = from_config(second.url, "tiny", cache_dir=str(tmp_path), api_key_env="CAI_TEST_KEY")
        assert again.generate(["a", "b", "c"], params) == texts == ["re a", "re b", "re c"]
        assert again.choice_logprobs([judge_chat("one")], list(CHOICE_OPTIONS)) == scores
        assert again.usage == {"requests": 0, "cache_hits": 4, "prompt_tokens": 0, "completion_tokens": 0}
    assert second.requests == []
    files = sorted((tmp_path / "http_cache").rglob("*.json"))
    keys = sorted(cache_key(path.removeprefix("/v1"), body) for path, _, body in first.requests)
    assert [f.stem for f in files] == keys and all(f.parent.name == f.stem[:2] for f in files)
    for text in [*(f.read_text() for f in files), repr(backend), str(backend.usage), str(vars(backend.http))]:
        assert "sk-cache-secret" not in text and "sk-another-key" not in text


def test_an_answer_that_lost_its_logprobs_is_not_cached(tmp_path):
    """A server that loses its log-probs mid-run stops the run; once it is fixed, the rerun asks again."""
    lost = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}, "logprobs": None}]}
    with Scripted(lambda *a: (200, {}, lost)) as broken:
        with pytest.raises(LogprobsUnavailable):
            http_backend(broken.url, cache_dir=tmp_path).choice_logprobs([judge_chat("x")], list(CHOICE_OPTIONS))
    assert not list(tmp_path.rglob("*.json"))
    with Scripted(lambda *a: chat_top([("A", -1.0), ("B", -2.0)])) as fixed:
        assert http_backend(fixed.url, cache_dir=tmp_path).choice_logprobs([judge_chat("x")], list(CHOICE_OPTIONS)) == [[-1.0, -2.0]]
    assert len(fixed.requests) == 1 and len(list(tmp_path.rglob("*.json"))) == 1


def test_a_5xx_storm_stops_in_one_sentence_and_the_cache_keeps_what_finished(tmp_path):
    def storm_after_two(n, path, body, headers):
        return ok_text(f"re {body['prompt']}") if n <= 2 else (503, {}, {"error": {"message": "overloaded"}})

    prompts = ["a", "b", "c", "d"]
    with Scripted(storm_after_two) as srv:
        backend = http_backend(srv.url, concurrency=1, max_retries=2, cache_dir=tmp_path)
        with pytest.raises(CaiError) as err:
            backend.generate(prompts, SamplingParams())
    assert str(err.value) == (f"request to {srv.url}/completions failed after 3 attempts; "
                              "the last error was HTTP 503: overloaded")
    assert len(list((tmp_path / "http_cache").rglob("*.json"))) == 2
    with Scripted(answer_by_request) as healthy:
        rerun = http_backend(healthy.url, concurrency=1, cache_dir=tmp_path)
        assert rerun.generate(prompts, SamplingParams()) == ["re a", "re b", "re c", "re d"]
    assert [b["prompt"] for _, _, b in healthy.requests] == ["c", "d"]
    assert rerun.usage["cache_hits"] == 2


# ---------------------------------------------------------------------------- small parts

def test_backoff_grows_caps_and_jitters():
    assert backoff_delay(0, None, 1.0, 30.0, rng=lambda: 0.0) == 0.5
    assert backoff_delay(3, None, 1.0, 30.0, rng=lambda: 0.999) == pytest.approx(8.0, rel=1e-3)
    assert backoff_delay(10, None, 1.0, 30.0, rng=lambda: 1.0) == 30.0
    assert backoff_delay(0, 7.0, 1.0, 2.0) == 7.0
    assert backoff_delay(0, 10_000.0, 1.0, 2.0) == 120.0
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 50 < parse_retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))) <= 60


def test_from_config_and_bad_arguments():
    backend = from_config("http://a:1, http://b:2/api/v1", "m", concurrency=2, mode="completion")
    assert backend.base_urls == ["http://a:1/v1", "http://b:2/api/v1"]
    assert (backend.concurrency, backend.mode, backend.has_chat_template) == (2, "completion", False)
    with pytest.raises(CaiError, match="unknown HTTP backend option 'retries'"):
        from_config(["http://a:1"], "m", retries=3)
    with pytest.raises(CaiError, match="not an http"):
        OpenAIHTTPBackend(["a:1"], "m")
    with pytest.raises(CaiError, match="mode"):
        OpenAIHTTPBackend(["http://a:1"], "m", mode="chats")


def test_missing_httpx_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "httpx", None)
    with pytest.raises(CaiError, match=r"pip install 'cai\[http\]'"):
        OpenAIHTTPBackend(["http://127.0.0.1:1"], "m")
