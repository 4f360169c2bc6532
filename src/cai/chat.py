"""``cai chat``: a multi-turn conversation with a model in the terminal."""

from __future__ import annotations

from typing import Any, Callable

from cai.types import SamplingParams


def chat_loop(backend: Any, params: SamplingParams, *, system: str | None = None, read: Callable[[str], str] = input,
              say: Callable[[str], None] = print, note: Callable[[str], None] = print) -> None:
    """Read a user turn, answer it with the whole conversation so far, repeat.

    ``/reset`` clears the conversation (keeping the system prompt), ``/exit``, ``/quit``, Ctrl-D or
    Ctrl-C end it. Each reply is seeded from ``params.seed`` and its turn number, so a session
    replays exactly.
    """
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    note("ready: type a message; /reset starts over, /exit quits")
    turn = 0
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            note("")
            return
        if not text:
            continue
        if text in {"/exit", "/quit"}:
            return
        if text == "/reset":
            history = list(base)
            note("(conversation cleared)")
            continue
        history.append({"role": "user", "content": text})
        decoder = getattr(backend, "static_decoder", None)
        compiled_before = set(decoder.compile_seconds) if decoder is not None else set()
        reply = backend.generate([history], params, seeds=[params.seed + turn])[0].strip()
        for window in sorted(set(decoder.compile_seconds) - compiled_before) if decoder is not None else []:
            note(f"(compiled the decoding step for a {window}-token window in {decoder.compile_seconds[window]:.0f} s; "
                 "once per window and session)")
        turn += 1
        history.append({"role": "assistant", "content": reply})
        say(reply)
