"""RL-CAI data: AI feedback labels for response pairs, by a judging method (`cai.judging`).

For each pair (A, B) of responses to one prompt, a feedback model sees the conversation, a
feedback principle's question and the two options, and its preference is read as P(A is better),
a **soft label**: from the log-probabilities of " (A)" and " (B)" after "The answer is:" (``mc``),
the same after a chain of thought (``mc-cot``), or the share of sampled written verdicts
(``votes``). ``rlcd`` asks no judge: its pairs were sampled under a principle and under its
violation, so they are preferred by construction. ``auto`` (the default) measures each judging
method on gold dev pairs first, by this same procedure, and labels with the best; the manifest
keeps the whole table and says whether the labels carry any signal at all.

- **Ensemble:** M principles are drawn per pair (seeded by the pair id); their probabilities are
  averaged, as in the paper.
- **Position bias:** each principle is asked in both orders, (A, B) and (B, A). The two answers'
  log-odds are averaged, which cancels any constant preference for the first (or second) slot
  exactly; the raw per-order probabilities are kept so the bias can be measured.
- **Chain of thought** (``mc-cot``): the answer's probabilities read after the model's reasoning
  are clamped to a band (default 0.4-0.6), because post-reasoning probabilities are overconfident.
- **Abstentions:** a question the judge answers with neither option (no parsable vote, neither
  option among a server's top log-probs) is recorded as such, never guessed; a pair whose every
  question abstained is kept with ``abstained: true`` and trains nothing.
- **Hard labels:** optionally rounded to 0/1 (0.5 stays 0.5).

Output rows carry TRL-ready ``prompt`` / ``chosen`` / ``rejected`` (conversational) and ``score``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from cai import prompts as P
from cai.backends import load_backend
from cai.backends.base import Backend
from cai.config import LabelConfig, RunConfig
from cai.constitution import Constitution, FeedbackPrinciple, sample_feedback_principles
from cai.constitution_yaml import load_constitution
from cai.data.gold import GoldPair, load_gold_pairs, stratified
from cai.errors import CaiError
from cai.eval.judge_check import judge_agreement, judge_pairs_from_gold, position_bias
from cai.config_loader import config_hash_of
from cai.io import JsonlWriter, iter_batches, read_jsonl, write_json_atomic, write_text_atomic
from cai.judging import JUDGE_METHODS, Question, ask, combine_orders
from cai.progress import progress_bar
from cai.locks import acquire_folder, release_folder
from cai.runs import StageRun
from cai.sharding import shard_rows

console = Console(stderr=True)

ORDERS = ("ab", "ba")


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
    instead of the constitution's harmlessness principles. ``label.method`` names the judging
    method; ``auto`` is resolved by the stage (`choose_method`) and, called here directly, reads as ``mc``.
    """
    if config.method == "rlcd":
        raise CaiError("rlcd pairs are preferred by construction and need no judge; label_pairs judges pairs")
    if config.method == "auto":
        config = config.model_copy(update={"method": "mc"})
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


def _score_jobs(chunk, jobs, constitution, backend, config, chat, seed, progress) -> tuple[list[float | None], list[Any]]:
    """P(first option) (None: abstained) for every job, by ``label.method``, in one batched call per chunk."""
    questions = [Question(chunk[k]["prompt"], *_options(chunk[k], o), pr, (chunk[k]["id"], m, o))
                 for k, m, pr, o in jobs]
    return ask(config.method, questions, constitution=constitution, backend=backend, config=config, chat=chat,
               seed=seed, progress=progress)


def _label_row(pair, jobs, probs, notes, k, config: LabelConfig) -> dict[str, Any]:
    per_principle = []
    for m, principle in enumerate(pair.pop("_principles")):
        p_first, texts = {}, {}
        for (jk, jm, _, order), p, note in zip(jobs, probs, notes):
            if jk == k and jm == m:
                p_first[order] = p
                texts[order] = note
        raw = dict(p_first)
        if config.method == "mc-cot":
            p_first = {o: None if p is None else clamp(p, tuple(config.clamp)) for o, p in p_first.items()}
        abstained = all(p is None for p in p_first.values())
        entry: dict[str, Any] = {"principle_id": principle.id,
                                 "p_a": None if abstained else round(combine_orders(p_first), 6),
                                 "p_first": {o: None if p is None else round(p, 6) for o, p in raw.items()}}
        if config.method == "mc-cot":
            entry["reasoning"] = texts
        elif config.method == "votes":
            entry["votes"] = texts
        per_principle.append(entry)
    known = [e["p_a"] for e in per_principle if e["p_a"] is not None]
    # Every question abstained: the pair carries no label; it is kept (counted) but trains nothing.
    p_a = sum(known) / len(known) if known else 0.5
    if config.hard:
        p_a = 1.0 if p_a > 0.5 else 0.0 if p_a < 0.5 else 0.5
    a_wins = p_a >= 0.5
    chosen, rejected = (pair["response_a"], pair["response_b"]) if a_wins else (pair["response_b"], pair["response_a"])
    return {
        **pair,
        "p_a": round(p_a, 6),
        "label": "hard" if config.hard else "soft",
        "method": config.method,
        "abstained": not known,
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
    pairs = judge_pairs_from_gold(gold)
    labelled = label_pairs(pairs, constitution=constitution, backend=backend, config=config,
                           out_path=out_path, seed=seed,
                           helpfulness_principle=FeedbackPrinciple("helpfulness", config.helpfulness_question),
                           show_progress=show_progress)
    asked = {p["id"] for p in pairs}  # the file may hold more pairs, from an earlier, larger check
    return judge_agreement([r for r in labelled if r["id"] in asked])


def run_label(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``label``: soft AI preference labels for the sampled pairs, into ``label/``.

    With ``label.method: rlcd`` no judge is asked: the sampled pairs are preferred by construction.
    Otherwise the judging method (``auto``: the best one measured on gold dev pairs) labels them.
    """
    st = StageRun(cfg, "label", shard)
    constitution = load_constitution(cfg.constitution)
    source = st.require("sample")
    if st.skip():
        return st.dir
    rows = read_jsonl(source / "red-team.jsonl") + read_jsonl(source / "helpfulness.jsonl")
    if cfg.label.method == "rlcd":
        return _label_by_construction(st, shard_rows(rows, shard), source)
    pairs, identical = make_pairs(rows, cfg.label.pairing)
    if not pairs:
        raise CaiError(f"every sampled pair in {source} has two identical responses; sample at a higher temperature")
    pairs = shard_rows(pairs, shard)
    model_cfg = cfg.label.feedback_model or cfg.model
    st.start(model=model_cfg.name, pairs=len(pairs), identical_pairs_dropped=identical)
    if not pairs:  # a small set can leave a hash shard empty: nothing to label is a finished shard
        st.done(pairs=0)
        return st.dir
    # A server's answers are cached in the stage folder, so a resumed run pays for nothing twice.
    backend = load_backend(model_cfg, cache_dir=st.dir)
    try:
        config, found = choose_method(cfg, constitution, backend, st.dir, show_progress)
        st.update(**found)
        labelled = label_pairs(pairs, constitution=constitution, backend=backend, config=config,
                               out_path=st.dir / "data.jsonl", seed=cfg.seed,
                               helpfulness_principle=FeedbackPrinciple("helpfulness", cfg.label.helpfulness_question),
                               show_progress=show_progress)
        usage = getattr(backend, "usage", None)  # requests and tokens, for a server
    finally:
        backend.close()
    p = [r["p_a"] for r in labelled if not r.get("abstained")]
    st.done(pairs=len(labelled), identical_pairs_dropped=identical, position_bias=position_bias(labelled),
            abstentions=len(labelled) - len(p), **found, **({"server_usage": usage} if usage else {}),
            mean_p_a=round(sum(p) / len(p), 4) if p else None,
            mean_confidence=round(sum(abs(x - 0.5) for x in p) / len(p) + 0.5, 4) if p else None)
    return st.dir


def measure_methods(gold: Sequence[GoldPair], methods: Sequence[str], *, constitution: Constitution, backend: Backend,
                    config: LabelConfig, folder: Path, seed: int, show_progress: bool) -> dict[str, dict[str, Any]]:
    """Each judging method's agreement with ``gold``, by `check_judge` (the labelling procedure itself).

    A method the backend cannot run (a server without log-probs, or one that refuses the request,
    for ``mc``) is recorded with the reason instead of a figure; if none can run, `choose_method`
    stops with every reason. Rows resume from ``folder/gold_check.<method>.jsonl``.
    """
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        try:
            table[method] = check_judge(gold, constitution=constitution, backend=backend,
                                        config=config.model_copy(update={"method": method}),
                                        out_path=folder / f"gold_check.{method}.jsonl", seed=seed,
                                        show_progress=show_progress)
        except CaiError as err:  # no log-probs, or a server that refuses the request this method needs
            table[method] = {"unsupported": str(err)}
    return table


def best_method(table: dict[str, dict[str, Any]]) -> str | None:
    """The method to judge with: of those whose interval clears chance, the one with the highest
    agreement (then the higher interval floor, fewer abstentions, the cheaper); when none clears
    chance, the cheapest that answered, because a costlier method that is just as indistinguishable
    from a coin buys nothing. A method that abstained on every pair measured nothing and is taken
    only when no other could run."""
    measured = [m for m, r in table.items() if "all" in r]
    answering = [m for m in measured if table[m].get("abstentions", 0) < table[m]["all"]["pairs"]]
    if not measured:
        return None
    candidates = answering or measured
    cleared = [m for m in candidates if table[m]["all"]["ci"][0] > 0.5]
    if not cleared:
        return min(candidates, key=JUDGE_METHODS.index)
    return max(cleared, key=lambda m: (table[m]["all"]["agreement"], table[m]["all"]["ci"][0],
                                       -table[m].get("abstentions", 0), -JUDGE_METHODS.index(m)))


def method_table(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The manifest's (and report's) form of `measure_methods`: rounded figures per method and kind."""
    out: dict[str, dict[str, Any]] = {}
    for method, result in table.items():
        if "unsupported" in result:
            out[method] = {"unsupported": result["unsupported"]}
            continue
        out[method] = {kind: {"pairs": r["pairs"], "agreement": round(r["agreement"], 4),
                              "ci": [round(r["ci"][0], 4), round(r["ci"][1], 4)]}
                       for kind, r in result.items() if isinstance(r, dict)}
        out[method].update(trusted=result["trusted"], position_bias=result["position_bias"],
                           abstentions=result.get("abstentions", 0),
                           mean_confidence=None if result["mean_confidence"] is None else round(result["mean_confidence"], 4))
    return out


def choose_method(cfg: RunConfig, constitution: Constitution, backend: Backend, folder: Path,
                  show_progress: bool) -> tuple[LabelConfig, dict[str, Any]]:
    """The label config to label with (its method concrete) and what the choice rests on, for the manifest.

    ``auto`` measures every method of ``label.auto_methods`` on ``label.gold_check`` dev gold pairs
    and takes the best of those that clear chance, or the cheapest when none does; a named method is measured alone. Says the result in one line, and whether
    the labels carry any signal (the chosen method's interval clears chance) or not.

    Raises:
        CaiError: no method can run on this backend.
    """
    config = cfg.label
    if not config.gold_check:
        chosen = "mc" if config.method == "auto" else config.method
        note = " (label.gold_check is 0, so nothing was measured)" if config.method == "auto" else ""
        console.print(f"label: method {chosen}{note}; the labels' agreement with human judgement is not measured")
        return config.model_copy(update={"method": chosen}), {"method": chosen}
    methods = list(dict.fromkeys(config.auto_methods)) if config.method == "auto" else [config.method]
    gold = stratified(load_gold_pairs("gold", "dev"), config.gold_check)
    table = measure_methods(gold, methods, constitution=constitution, backend=backend, config=config, folder=folder,
                            seed=cfg.seed, show_progress=show_progress)
    chosen = best_method(table)
    if chosen is None:
        reasons = "; ".join(f"{m}: {r['unsupported']}" for m, r in table.items())
        raise CaiError(f"label: no judging method can run on this feedback model ({reasons}); "
                       "try label.method=votes, or a server that returns log-probabilities")
    result = table[chosen]["all"]
    low, high = result["ci"]
    others = ", ".join(f"{m} {r['all']['agreement']:.0%}" if "all" in r else f"{m} cannot run" for m, r in table.items()
                       if m != chosen)
    console.print(
        f"label: method {chosen}{' (auto)' if config.method == 'auto' else ''} agrees with the human gold labels on "
        f"{result['agreement']:.0%} [{low:.0%}, {high:.0%}] of {result['pairs']} dev pairs"
        + (f" ({others})" if others else "")
        + ("" if low > 0.5 else f"; no method clears chance, so the cheapest, {chosen}, labels and the labels carry "
           "no signal" if config.method == "auto" else "; not distinguishable from chance, so these labels carry no signal"))
    return config.model_copy(update={"method": chosen}), {
        "method": chosen, "method_chosen_by": "auto" if config.method == "auto" else "config",
        "judge_methods": method_table(table), "labels_carry_signal": low > 0.5,
        "gold_agreement": round(result["agreement"], 4), "gold_agreement_ci": [round(low, 4), round(high, 4)],
        "gold_pairs_checked": result["pairs"]}


def judge_check_table(cfg: RunConfig, *, split: str = "dev", limit: int | None = None,
                      methods: Sequence[str] | None = None, show_progress: bool = True) -> dict[str, Any]:
    """``cai judge-check``: each judging method's agreement with the gold pairs of ``split``, before a long run.

    The feedback model (``label.feedback_model``, else ``model``) labels the gold pairs by exactly
    the label stage's procedure. Rows resume from ``runs/<name>/judge-check/<split>-<hash>/``, the
    hash naming the model and label settings, so a changed config never reuses old rows.

    Returns:
        ``{"split", "model", "pairs", "methods": method_table, "best"}``, also written as ``table.json`` there.
    """
    model_cfg = cfg.label.feedback_model or cfg.model
    gold = stratified(load_gold_pairs("gold", None if split == "all" else split),
                      limit if limit is not None else (cfg.label.gold_check or None))
    key = config_hash_of({"model": model_cfg.model_dump(mode="json"), "label": cfg.label.model_dump(mode="json"),
                          "constitution": cfg.constitution, "seed": cfg.seed})
    folder = cfg.run_dir / "judge-check" / f"{split}-{key[:10]}"
    acquire_folder(folder, "judge-check")
    try:
        constitution = load_constitution(cfg.constitution)
        backend = load_backend(model_cfg, cache_dir=folder)
        try:
            table = measure_methods(gold, list(dict.fromkeys(methods or cfg.label.auto_methods)),
                                    constitution=constitution, backend=backend, config=cfg.label, folder=folder,
                                    seed=cfg.seed, show_progress=show_progress)
        finally:
            backend.close()
        result = {"split": split, "model": model_cfg.name, "pairs": len(gold), "methods": method_table(table),
                  "best": best_method(table)}
        write_json_atomic(folder / "table.json", result)
    finally:
        release_folder(folder)
    return result


def _label_by_construction(st: StageRun, rows: list[dict[str, Any]], source: Path) -> Path:
    """``rlcd``: each red-team prompt's two answers were sampled under a principle and under its
    violation (`cai.stages.sample`), so the first is preferred and no judge is asked.

    Helpfulness answers carry no such contrast and are left out (counted); the PM can mix in
    human helpfulness comparisons (``pm.human_data``).
    """
    contrast = [r for r in rows if r.get("rlcd")]
    if any(r.get("set", "red-team") != "helpfulness" and not r.get("rlcd") for r in rows):
        raise CaiError(f"label.method is rlcd but the samples in {source} were not drawn as contrast pairs; "
                       "set sample.rlcd=true and redo the sample stage (--from sample)")
    st.start(model="none (rlcd: preferred by construction)", pairs=len(contrast))
    labelled = []
    for row in contrast:
        preferred = row["rlcd"]["preferred"]
        a, b = row["responses"][0], row["responses"][1]
        p_a = 1.0 if preferred == 0 else 0.0
        chosen, rejected = (a, b) if preferred == 0 else (b, a)
        labelled.append({"id": f"{row['id']}:0-1", "source_id": row["id"], "category": row.get("category", ""),
                         "split": row.get("split", "train"), "set": row.get("set", "red-team"), "prompt": row["prompt"],
                         "response_a": a, "response_b": b, "p_a": p_a, "label": "hard", "method": "rlcd",
                         "abstained": False,
                         "per_principle": [{"principle_id": row["rlcd"]["principle_id"], "p_a": p_a}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}], "score": 1.0})
    write_text_atomic(st.dir / "data.jsonl", "".join(json.dumps(r) + "\n" for r in labelled))
    st.done(pairs=len(labelled), method="rlcd", helpfulness_pairs_left_out=len(rows) - len(contrast),
            labels_carry_signal=None)
    return st.dir
