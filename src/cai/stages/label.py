"""RL-CAI data: AI feedback labels for response pairs, read as multiple-choice log-probabilities.

For each pair (A, B) of responses to one prompt, a feedback model sees the conversation, a
feedback principle's question and the two options, and we read log P(" (A)") and log P(" (B)")
after "The answer is:". Normalised over the two, that is P(A is better): a **soft label**.

- **Ensemble:** M principles are drawn per pair (seeded by the pair id); their probabilities are
  averaged, as in the paper.
- **Position bias:** each principle is asked in both orders, (A, B) and (B, A). The two answers'
  log-odds are averaged, which cancels any constant preference for the first (or second) slot
  exactly; the raw per-order probabilities are kept so the bias can be measured.
- **Chain of thought:** the feedback model first writes its reasoning ("Let's think step by step"),
  then the answer's probabilities are read after it and clamped to a band (default 0.4-0.6),
  because post-reasoning probabilities are overconfident.
- **Hard labels:** optionally rounded to 0/1 (0.5 stays 0.5).

Output rows carry TRL-ready ``prompt`` / ``chosen`` / ``rejected`` (conversational) and ``score``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Sequence

from cai import prompts as P
from cai.backends import load_backend
from cai.backends.base import Backend, stable_seed
from cai.config import LabelConfig, RunConfig
from cai.constitution import Constitution, FeedbackPrinciple, sample_feedback_principles
from cai.constitution_yaml import load_constitution
from cai.data.gold import GoldPair, load_gold_pairs, stratified
from cai.errors import CaiError
from cai.eval.judge_check import judge_agreement, judge_pairs_from_gold, position_bias
from cai.io import JsonlWriter, iter_batches, read_jsonl
from cai.progress import progress_bar
from cai.runs import StageRun
from cai.sharding import shard_rows

ORDERS = ("ab", "ba")


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def logit(p: float, eps: float = 1e-6) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def first_option_probability(logprob_a: float, logprob_b: float) -> float:
    """P(first option) from the two options' log-probabilities, normalised over the two."""
    return sigmoid(logprob_a - logprob_b)


def combine_orders(p_first: dict[str, float]) -> float:
    """P(A better) from the per-order P(first option): average in log-odds space.

    With a constant position bias b (in log-odds), P_ab = sigmoid(d + b) and P_ba = sigmoid(-d + b)
    for a true preference d; the average of logit(P_ab) and -logit(P_ba) is exactly d.
    """
    terms = []
    if "ab" in p_first:
        terms.append(logit(p_first["ab"]))
    if "ba" in p_first:
        terms.append(-logit(p_first["ba"]))
    return sigmoid(sum(terms) / len(terms))


def clamp(p: float, band: tuple[float, float]) -> float:
    return min(max(p, band[0]), band[1])


def make_pairs(rows: list[dict[str, Any]], pairing: str) -> tuple[list[dict[str, Any]], int]:
    """Pairs of distinct responses per prompt: consecutive (0-1, 2-3, ...) or all combinations.

    Returns (pairs, number of identical pairs dropped: they carry no preference).
    """
    pairs, identical = [], 0
    for row in rows:
        responses = row["responses"]
        if pairing == "all":
            index_pairs = list(itertools.combinations(range(len(responses)), 2))
        else:
            index_pairs = [(i, i + 1) for i in range(0, len(responses) - 1, 2)]
        for i, j in index_pairs:
            a, b = responses[i], responses[j]
            if a.strip() == b.strip():
                identical += 1
                continue
            pairs.append({"id": f"{row['id']}:{i}-{j}", "source_id": row["id"], "category": row.get("category", ""),
                          "split": row.get("split", "train"), "set": row.get("set", "red-team"),
                          "prompt": row["prompt"], "response_a": a, "response_b": b})
    return pairs, identical


def label_pairs(
    pairs: list[dict[str, Any]],
    *,
    constitution: Constitution,
    backend: Backend,
    config: LabelConfig,
    out_path: str | Path,
    seed: int = 0,
    helpfulness_principle: FeedbackPrinciple | None = None,
    show_progress: bool = True,
    on_chunk: Any = None,
) -> list[dict[str, Any]]:
    """Label every pair not yet in ``out_path``; return all labelled rows.

    Pairs whose ``set`` is ``helpfulness`` are judged under ``helpfulness_principle`` (when given)
    instead of the constitution's harmlessness principles.
    """
    chat = P.use_chat_format(config.prompt_format, backend)
    done = {r["id"] for r in read_jsonl(out_path, repair=True)}
    todo = [p for p in pairs if p["id"] not in done]
    orders = ORDERS if config.swap else ORDERS[:1]
    with JsonlWriter(out_path) as writer, progress_bar("labeling", len(todo), enabled=show_progress) as advance:
        for chunk in iter_batches(todo, config.chunk_size):
            jobs = []  # one (pair index, principle index, principle, order) per multiple-choice question
            for k, pair in enumerate(chunk):
                if pair.get("set") == "helpfulness" and helpfulness_principle is not None:
                    # One question: asking the same one M times would cost M times the compute for one answer.
                    principles = [helpfulness_principle]
                else:
                    principles = sample_feedback_principles(constitution, config.principles_per_label, seed, pair["id"])
                pair["_principles"] = principles
                for m, principle in enumerate(principles):
                    for order in orders:
                        jobs.append((k, m, principle, order))
            probs, reasoning = _score_jobs(chunk, jobs, constitution, backend, config, chat, seed,
                                           lambda _r, n: advance(0, n))
            for k, pair in enumerate(chunk):
                writer.write(_label_row(pair, jobs, probs, reasoning, k, config))
            advance(len(chunk), 0)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return read_jsonl(out_path)


def _options(pair: dict[str, Any], order: str) -> tuple[str, str]:
    return (pair["response_a"], pair["response_b"]) if order == "ab" else (pair["response_b"], pair["response_a"])


def _score_jobs(chunk, jobs, constitution, backend, config, chat, seed, progress) -> tuple[list[float], list[str | None]]:
    """P(first option) for every job: one batched (CoT: generate, then) scoring call per chunk."""
    reasoning: list[str | None] = [None] * len(jobs)
    if config.cot:
        build = P.cot_chat if chat else P.cot_text
        cot_prompts = [build(constitution, chunk[k]["prompt"], *_options(chunk[k], o), pr) for k, _, pr, o in jobs]
        seeds = [stable_seed(seed, chunk[k]["id"], "cot", m, o) for k, m, _, o in jobs]
        texts = backend.generate(cot_prompts, config.cot_sampling.params(), seeds=seeds, progress=progress)
        reasoning = [P.clean_output(t) for t in texts]
        follow = P.cot_answer_chat if chat else P.cot_answer_text
        prompts = [follow(p, r) for p, r in zip(cot_prompts, reasoning)]
    else:
        build = P.choice_chat if chat else P.choice_text
        prompts = [build(constitution, chunk[k]["prompt"], *_options(chunk[k], o), pr) for k, _, pr, o in jobs]
    rendered = [backend.render(p) for p in prompts]
    logprobs = backend.choice_logprobs(rendered, list(P.CHOICE_OPTIONS))
    return [first_option_probability(lp[0], lp[1]) for lp in logprobs], reasoning


def _label_row(pair, jobs, probs, reasoning, k, config: LabelConfig) -> dict[str, Any]:
    per_principle = []
    for m, principle in enumerate(pair.pop("_principles")):
        p_first, texts = {}, {}
        for (jk, jm, _, order), p, text in zip(jobs, probs, reasoning):
            if jk == k and jm == m:
                p_first[order] = p
                texts[order] = text
        raw = dict(p_first)
        if config.cot:
            p_first = {o: clamp(p, tuple(config.clamp)) for o, p in p_first.items()}
        entry: dict[str, Any] = {"principle_id": principle.id, "p_a": round(combine_orders(p_first), 6),
                                 "p_first": {o: round(p, 6) for o, p in raw.items()}}
        if config.cot:
            entry["reasoning"] = texts
        per_principle.append(entry)
    p_a = sum(e["p_a"] for e in per_principle) / len(per_principle)
    if config.hard:
        p_a = 1.0 if p_a > 0.5 else 0.0 if p_a < 0.5 else 0.5
    a_wins = p_a >= 0.5
    chosen, rejected = (pair["response_a"], pair["response_b"]) if a_wins else (pair["response_b"], pair["response_a"])
    return {
        **pair,
        "p_a": round(p_a, 6),
        "label": "hard" if config.hard else "soft",
        "cot": config.cot,
        "per_principle": per_principle,
        # TRL's conversational preference format: the prompt turns, then one assistant turn each.
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "score": round(max(p_a, 1 - p_a), 6),
    }


def check_judge(
    gold: Sequence[GoldPair],
    *,
    constitution: Constitution,
    backend: Backend,
    config: LabelConfig,
    out_path: str | Path,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """A judge's agreement with gold pairs, labelled by exactly this stage's procedure (`label_pairs`).

    The label stage runs it on dev pairs before labelling and ``cai eval`` before judging, so
    both report how far the labels they then make can be trusted. Rows resume from ``out_path``.

    Returns:
        `cai.eval.judge_check.judge_agreement` of the labelled pairs: per kind, agreement with a
        Wilson interval; ``trusted``, ``position_bias`` and ``mean_confidence``.
    """
    labelled = label_pairs(judge_pairs_from_gold(gold), constitution=constitution, backend=backend, config=config,
                           out_path=out_path, seed=seed,
                           helpfulness_principle=FeedbackPrinciple("helpfulness", config.helpfulness_question),
                           show_progress=show_progress)
    return judge_agreement(labelled)


def run_label(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``label``: soft AI preference labels for the sampled pairs, into ``label/``."""
    st = StageRun(cfg, "label", shard)
    constitution = load_constitution(cfg.constitution)
    source = st.require("sample")
    if st.skip():
        return st.dir
    rows = read_jsonl(source / "red-team.jsonl") + read_jsonl(source / "helpfulness.jsonl")
    pairs, identical = make_pairs(rows, cfg.label.pairing)
    if not pairs:
        raise CaiError(f"every sampled pair in {source} has two identical responses; sample at a higher temperature")
    pairs = shard_rows(pairs, shard)
    model_cfg = cfg.label.feedback_model or cfg.model
    st.start(model=model_cfg.name, pairs=len(pairs), identical_pairs_dropped=identical)
    if not pairs:  # a small set can leave a hash shard empty: nothing to label is a finished shard
        st.done(pairs=0)
        return st.dir
    backend = load_backend(model_cfg)
    try:
        gold = _gold_check(cfg, constitution, backend, st.dir, show_progress)
        if gold:
            st.update(**gold)
        labelled = label_pairs(pairs, constitution=constitution, backend=backend, config=cfg.label,
                               out_path=st.dir / "data.jsonl", seed=cfg.seed,
                               helpfulness_principle=FeedbackPrinciple("helpfulness", cfg.label.helpfulness_question),
                               show_progress=show_progress)
    finally:
        backend.close()
    p = [r["p_a"] for r in labelled]
    st.done(pairs=len(labelled), identical_pairs_dropped=identical, position_bias=position_bias(labelled),
            mean_p_a=round(sum(p) / len(p), 4), mean_confidence=round(sum(abs(x - 0.5) for x in p) / len(p) + 0.5, 4))
    return st.dir


def _gold_check(cfg: RunConfig, constitution: Constitution, backend: Backend, folder: Path,
                show_progress: bool) -> dict[str, Any]:
    """Score the feedback model on gold dev pairs by this stage's own procedure, before labelling.

    Says in one line how often it agrees with the human labels, so a user knows what the labels
    are worth before training on them. Returns manifest counts (empty when ``label.gold_check`` is 0).
    """
    if not cfg.label.gold_check:
        return {}
    from rich.console import Console

    result = check_judge(stratified(load_gold_pairs("gold", "dev"), cfg.label.gold_check), constitution=constitution,
                         backend=backend, config=cfg.label, out_path=folder / "gold_check.jsonl", seed=cfg.seed,
                         show_progress=show_progress)["all"]
    low, high = result["ci"]
    Console(stderr=True).print(
        f"label: the feedback model agrees with the human gold labels on {result['agreement']:.0%} "
        f"[{low:.0%}, {high:.0%}] of {result['pairs']} dev pairs" + ("" if low > 0.5 else
                                                                      " -- not distinguishable from chance"))
    return {"gold_agreement": round(result["agreement"], 4), "gold_agreement_ci": [round(low, 4), round(high, 4)],
            "gold_pairs_checked": result["pairs"]}
