"""The CLI: commands work on a tiny model, and user mistakes are one sentence with exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_help_and_version_are_fast_and_plain():
    result = subprocess.run([sys.executable, "-m", "cai.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("generate", "chat", "demo", "version", "constitution", "data"):
        assert command in result.stdout
    version = subprocess.run([sys.executable, "-m", "cai.cli", "version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("cai ")


def test_generate_from_args_and_file(cai_cli, tiny_model_dir, tmp_path):
    result = cai_cli("generate", "hello there", "The quick fox", "-m", tiny_model_dir, "--max-new-tokens", 5)
    assert result.code == 0
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == ["hello there", "The quick fox"]
    assert all(isinstance(r["response"], str) for r in rows)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    out = tmp_path / "out.jsonl"
    assert cai_cli("generate", "-f", prompts, "-m", tiny_model_dir, "-o", out, "--set", "sampling.max_new_tokens=4").code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == ["first prompt", "second prompt"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "-m", "/no/such/model"], "not found"),
        (["generate", "-m", "bundled"], "no prompts given"),
        (["generate", "hi", "--set", "sampling.temprature=0.5"], "unknown key 'sampling.temprature'"),
        (["generate", "hi", "--set", "sampling.max_new_tokens=lots"], "'sampling.max_new_tokens'"),
        (["generate", "hi", "--set", "nonsense"], "key=value"),
        (["generate", "-f", "/no/such/prompts.jsonl"], "does not exist"),
        (["constitution", "validate", "/no/such/constitution.yaml"], "constitution"),
    ],
)
def test_user_mistakes_are_one_sentence(cai_cli, args, message):
    result = cai_cli(*args)
    assert result.code == 1
    assert message in result.err
    assert "Traceback" not in result.err


def test_empty_prompt_file(cai_cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = cai_cli("generate", "-f", empty)
    assert result.code == 1 and "no prompts" in result.err


def test_bad_config_file(cai_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    result = cai_cli("generate", "hi", "-c", bad)
    assert result.code == 1 and "not valid YAML at line" in result.err


def test_chat_session(tiny_model_dir):
    """A person's first try: two turns, a reset, and exit, all through stdin."""
    result = subprocess.run(
        [sys.executable, "-m", "cai.cli", "chat", "-m", str(tiny_model_dir), "--max-new-tokens", "4"],
        input="hello\nand again\n/reset\n/exit\n", capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant>") == 2
    assert "conversation cleared" in result.stderr


def test_chat_with_a_compiled_decoder_says_what_the_compile_cost(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "cai.cli", "chat", "-m", str(tiny_model_dir), "--max-new-tokens", "6", "--compile",
         "--temperature", "0"],
        input="hello\nand again\n/exit\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant>") == 2
    assert result.stderr.count("compiled the decoding step for a 256-token window") == 1  # once, not per reply
