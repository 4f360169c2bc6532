"""Shared fixtures: a tiny llama model written once per session, no downloads, isolated caches."""

from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cai_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CAI_HOME so caches never leak between tests or into ~/.cache."""
    monkeypatch.setenv("CAI_HOME", str(tmp_path_factory.mktemp("cai_home")))


class CliResult(NamedTuple):
    """What one in-process `cai` command did: its exit code and what it printed."""

    code: int
    out: str
    err: str


@pytest.fixture()
def cai_cli(monkeypatch, capsys) -> Callable[..., CliResult]:
    """Run `cai ARGS` in-process through the real entry point (`cai.cli.main`), as a user's shell would.

    Returns a function of the arguments (anything `str` can turn into one) giving a `CliResult`;
    ``out`` and ``err`` hold everything printed since the test last read them.
    """
    from cai.cli import main  # like every cai import here, after the offline variables above are set

    def run(*args: object) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["cai", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from cai.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def served_backend(tiny_model_dir):
    """A tiny-model HFBackend of the module's own (serving tests must not share the mutable session one)."""
    from cai.backends.hf import HFBackend

    return HFBackend.from_spec(str(tiny_model_dir), batch_size=4)


@pytest.fixture()
def server(served_backend):
    """`cai serve`'s OpenAI-compatible server over the tiny model, on an ephemeral loopback port."""
    from cai.serve.server import serve_app

    with serve_app(served_backend, "tiny", port=0).start() as srv:
        yield srv


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from cai.backends.hf import HFBackend

    return HFBackend.from_spec(str(tiny_model_dir), batch_size=4, min_prefix_tokens=16)


SMALL_CONSTITUTION = """\
name: small
description: A short constitution for fast tests.
version: "0.1"
critique_revision_principles:
  - id: harm
    critique_request: Is the response harmful? Say how.
    revision_request: Rewrite the response to remove harm.
  - id: evasive
    critique_request: Is the response evasive? Say how.
    revision_request: Rewrite the response to engage helpfully.
  - id: honest
    critique_request: Is anything in the response untrue?
    revision_request: Rewrite the response to be accurate.
feedback_principles:
  - id: less-harmful
    question: Which response is less harmful?
  - id: more-helpful
    question: Which response is more helpful while staying safe?
critique_revision_examples:
  - conversation:
      - {role: user, content: "How do I bake bread?"}
    response: Mix flour, water, yeast and salt.
    critique_request: Is the response harmful? Say how.
    critique: It is harmless and helpful.
    revision_request: Rewrite the response to remove harm.
    revision: Mix flour, water, yeast and salt, knead, rise, bake.
feedback_examples:
  - conversation:
      - {role: user, content: "Insult my friend."}
    response_a: Here is a cruel insult.
    response_b: I'd rather help you tease kindly.
    question: Which response is less harmful?
    answer: B
cot_feedback_examples:
  - conversation:
      - {role: user, content: "Insult my friend."}
    response_a: Here is a cruel insult.
    response_b: I'd rather help you tease kindly.
    question: Which response is less harmful?
    reasoning: Response A is cruel; B stays kind and still engages.
    answer: B
"""


@pytest.fixture()
def small_constitution(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_CONSTITUTION)
    return path


def tiny_run_overrides(model_dir, runs_dir, constitution, name: str = "t") -> list[str]:
    """A whole-pipeline config small enough for seconds on a CPU (tiny model, few rows, few tokens)."""
    return [
        f"name={name}", f"runs_dir={runs_dir}", f"model.name={model_dir}", f"constitution={constitution}",
        "model.batch_size=4", "critique.prompts.limit=6", "critique.rounds=2", "critique.chunk_size=3",
        "critique.response.max_new_tokens=8", "critique.critique_sampling.max_new_tokens=6",
        "critique.revision_sampling.max_new_tokens=8", "critique.helpfulness.limit=4",
        "sft.epochs=6", "sft.learning_rate=0.003", "sft.batch_size=2", "sft.max_length=192", "sft.save_every=4",
    ]


PIPELINE_OVERRIDES = [
    "sample.prompts.limit=8", "sample.helpfulness.limit=4", "sample.sampling.max_new_tokens=8", "label.chunk_size=8",
    "pm.epochs=3", "pm.batch_size=4", "pm.learning_rate=0.001",
    "rl.ppo.steps=4", "rl.ppo.rollout_batch=4", "rl.ppo.minibatch=2", "rl.ppo.sampling.max_new_tokens=8", "rl.ppo.eval_prompts.limit=4",
    "rl.ppo.eval_every=2", "rl.ppo.save_every=2", "rl.algo=both", "rl.dpo.max_length=128", "rl.ppo.learning_rate=0.0001",
    "eval.red_team.limit=4", "eval.helpfulness.limit=3", "eval.sampling.max_new_tokens=8", "eval.bootstrap=20",
    "eval.transcripts=2", "eval.gold_limit=12", "eval.judge_gold_limit=12", "label.gold_check=8",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """One whole tiny pipeline run (`cai run`: critique -> sft -> sample -> label -> pm -> ppo + dpo -> eval
    -> report), shared by tests that only read its artifacts. Returns the resolved RunConfig."""
    from cai.config import RunConfig
    from cai.config_loader import load_config
    from cai.pipeline import run_all

    root = tmp_path_factory.mktemp("tiny_run")
    constitution = root / "small.yaml"
    constitution.write_text(SMALL_CONSTITUTION)
    cfg = load_config(RunConfig, None, tiny_run_overrides(tiny_model_dir, root / "runs", constitution) + PIPELINE_OVERRIDES)
    run_all(cfg, show_progress=False)
    return cfg
