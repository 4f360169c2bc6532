"""`cai <command>`: the command-line interface, one plain table of subcommands.

Heavy libraries (torch, transformers) are imported inside the commands, so ``cai --help`` is
instant. A `CaiError` from anywhere becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cai import __version__
from cai.backends import load_backend
from cai.chat import chat_loop
from cai.config import GenerateConfig, RunConfig, rl_algorithms
from cai.config_loader import describe_fields, load_config, read_yaml
from cai.configs import shipped_config
from cai.constitution import constitution_summary, show_constitution
from cai.constitution_yaml import load_constitution
from cai.data import PromptRow, load_prompts, show_prompts
from cai.data.gold import load_gold_pairs, stratified
from cai.errors import CaiError
from cai.eval.mc import load_mc_file, mc_eval, mc_tables
from cai.eval.verdict import fmt_ci
from cai.export import check_export_type, export_gguf
from cai.io import write_json_atomic, write_text_atomic
from cai.pipeline import run_all, run_stage
from cai.progress import progress_bar
from cai.report.html import write_report
from cai.runs import get_stage, library_versions, merge_stage, stage_status
from cai.sharding import parse_shard
from cai.stages.label import judge_check_table
from cai.types import SamplingParams

app = typer.Typer(
    name="cai", help="Constitutional AI: train a model to be harmless and non-evasive from written principles.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)
constitution_app = typer.Typer(help="Inspect and check constitution files.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect prompt sets.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect run config keys.", no_args_is_help=True)
app.add_typer(constitution_app, name="constitution")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'bundled', a model folder, a .gguf file, or a hub id.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: key=value (repeatable).")]


@app.command()
def version() -> None:
    """Print the versions of cai and the libraries it runs on."""
    versions = library_versions()
    out.print(f"cai {versions.pop('cai')}")
    for name, value in versions.items():
        out.print(f"  {name} {value}")


def _generate_config(config: Path | None, model: str | None, sets: list[str] | None, **sampling):
    overrides = list(sets or [])
    if model is not None:
        overrides.insert(0, f"model.name={json.dumps(model)}")
    for key, value in sampling.items():
        if value is not None:
            overrides.insert(0, f"sampling.{key}={json.dumps(value)}")
    return load_config(GenerateConfig, config, overrides)


def _read_prompts(prompts: list[str], file: Path | None, limit: int | None):
    """Prompts from arguments (one single-turn chat each) or from a file or built-in set."""
    rows = [PromptRow(id=f"arg-{i}", messages=[{"role": "user", "content": p}]) for i, p in enumerate(prompts)]
    if file is not None:
        loaded, _ = load_prompts(str(file), limit=limit)
        rows += loaded
    for row in rows:
        if not row.messages or not row.messages[-1]["content"].strip():
            raise CaiError(f"prompt '{row.id}' is empty")
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise CaiError("no prompts given: pass them as arguments or with --file")
    return rows


@app.command()
def generate(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts to answer (each a single user turn).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Prompt file (.txt one per line, .jsonl, .csv, .parquet) or a built-in set (red-team, helpfulness).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSONL file to write (default: stdout).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="'bundled', a model folder, a .gguf file, or a hub id.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens to generate per answer.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Answer only the first N prompts.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer prompts with a model and write one JSONL row per prompt."""
    cfg = _generate_config(config, model, set_, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    rows = _read_prompts(list(prompts or []), file, limit)
    if output is not None and output.exists() and output.is_dir():
        raise CaiError(f"output path {output} is a folder; give a .jsonl file name")
    backend = load_backend(cfg.model)
    with progress_bar("generate", len(rows)) as advance:
        answers = backend.generate([r.messages for r in rows], cfg.sampling.params(), progress=advance)
    lines = [json.dumps({"id": r.id, "messages": r.messages, "response": a}, ensure_ascii=False)
             for r, a in zip(rows, answers)]
    if output is None:
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        write_text_atomic(output, "\n".join(lines) + "\n")
        err.print(f"wrote {len(lines)} rows to {output}")


@app.command()
def chat(
    model: ModelOpt = "bundled",
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    compile_decode: Annotated[bool, typer.Option(
        "--compile", help="Compile the decoding step (static KV cache): faster replies after a one-time compile "
                          "(tens of seconds on a small CPU) per 256/512/1024... token window.")] = False,
) -> None:
    """Talk to a model, multi-turn. /reset starts over, /exit (or Ctrl-D) quits."""
    from cai.backends.hf import HFBackend  # lazy: imports torch (seconds); `cai --help` and the other commands must not wait for it
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    err.print(f"loading {model} ...")
    backend = HFBackend.from_spec(model, batch_size=1, compile_decode=compile_decode)
    if compile_decode and backend.static_decoder is None:
        err.print("--compile: this model's decoding step can't be compiled as one graph; decoding uncompiled")
    chat_loop(backend, params, system=system,
              say=lambda reply: out.print(Text("assistant> ", style="bold cyan") + Text(reply)), note=err.print)


def _run_config(config: Path | None, sets: list[str] | None):
    return load_config(RunConfig, config, list(sets or []))


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Run config YAML (see configs/).")],
    set_: SetOpt = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Redo this stage and every later one.")] = None,
) -> None:
    """Run the whole pipeline: critique -> sft -> sample -> label -> pm -> rl -> eval -> report."""
    _run_and_summarise(_run_config(config, set_), from_stage)


@app.command()
def demo(
    set_: SetOpt = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Redo this stage and every later one.")] = None,
) -> None:
    """The whole pipeline on the bundled model, on a CPU in minutes (configs/demo.yaml)."""
    _run_and_summarise(_run_config(shipped_config("demo.yaml"), set_), from_stage)


def _run_and_summarise(cfg, from_stage: str | None) -> None:
    import time

    started = time.time()
    report = run_all(cfg, from_stage=from_stage)
    rows = stage_status(cfg.run_dir, cfg.rl.algo, cfg.baselines)
    # Each stage records its own peak (the process's high-water mark is reset per stage): the run's is the largest.
    peak = max((r for r in rows if r["peak_rss_gb"]), key=lambda r: r["peak_rss_gb"], default=None)
    where = f", peak memory {peak['peak_rss_gb']} GB ({peak['stage']})" if peak else ""
    out.print(_status_table(f"run '{cfg.name}' finished in {time.time() - started:.0f} s{where}", rows))
    labels = next((r["counts"] for r in rows if r["stage"] == "label"), None) or {}
    if labels.get("gold_agreement_ci"):
        agreement = fmt_ci(labels["gold_agreement"], labels["gold_agreement_ci"], percent=True)
        out.print(f"labels: method {labels.get('method')} agrees with the human gold labels on {agreement} of "
                  f"{labels.get('gold_pairs_checked')} dev pairs" + (
                      "" if labels.get("labels_carry_signal") else
                      ", which includes chance: the labels carry no signal, so the PM and RL stages learned from noise"))
    elif labels.get("method"):
        out.print(f"labels: method {labels['method']}"
                  + (" (no judge: preferred by construction)" if labels["method"] == "rlcd" else
                     "; its agreement with human labels was not measured (label.gold_check is 0)"))
    out.print(f"report: {report}")


def _status_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    for column in ("stage", "status", "attempts", "seconds", "peak GB", "counts"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["stage"], row["status"], str(row["attempts"] or ""), str(row["elapsed_s"] or ""),
                      str(row["peak_rss_gb"] or ""), row["counts_text"][:90])
    return table


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/demo.")]) -> None:
    """Each stage of a run: state, attempts, time, peak memory and counts."""
    if not run_dir.is_dir():
        raise CaiError(f"run folder {run_dir} does not exist")
    saved = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    algo = (saved.get("rl") or {}).get("algo") if isinstance(saved, dict) else None
    baselines = saved.get("baselines") if isinstance(saved, dict) and isinstance(saved.get("baselines"), list) else []
    out.print(_status_table(f"run {run_dir}", stage_status(run_dir, algo, baselines)))
    report = run_dir / "report.html"
    out.print(f"report: {report}" if report.is_file() else "report: not written yet (cai report RUN)")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/demo.")]) -> None:
    """Write RUN/report.html: Elo picture, revision curve, RL curves, calibration, transcripts."""
    out.print(f"report: {write_report(run_dir)}")


ShardOpt = Annotated[Optional[str], typer.Option(help="Run only shard i of N (e.g. 0/4) of the rows; merge with `cai merge`.")]


def _stage(name: str, config: Path | None, sets: list[str] | None, shard: str | None = None) -> None:
    """Run one stage of `cai.runs.STAGES` from the command line and say where its output is."""
    if shard is not None:
        parse_shard(shard)  # a malformed --shard fails before the config or any model loads
    path = run_stage(_run_config(config, sets), name, shard=shard)
    out.print(f"{name}: {get_stage(name).summary} in {path}")


@app.command()
def critique(config: ConfigOpt = None, set_: SetOpt = None, shard: ShardOpt = None) -> None:
    """SL-CAI data: answer red-team prompts, then critique and revise them (resumable)."""
    _stage("critique", config, set_, shard)


@app.command()
def sft(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """SL-CAI training: fine-tune the model on its revisions (resumable)."""
    _stage("sft", config, set_)


@app.command()
def sample(config: ConfigOpt = None, set_: SetOpt = None, shard: ShardOpt = None) -> None:
    """RL-CAI data: K responses per prompt from the SL-CAI policy (resumable)."""
    _stage("sample", config, set_, shard)


@app.command()
def label(config: ConfigOpt = None, set_: SetOpt = None, shard: ShardOpt = None) -> None:
    """RL-CAI data: soft AI preference labels for the sampled pairs (resumable)."""
    _stage("label", config, set_, shard)


@app.command()
def merge(
    stage: Annotated[str, typer.Argument(help="critique, sample or label.")],
    shards: Annotated[int, typer.Option(help="How many shards the stage was split into.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Merge a generation stage run as N shards (on N machines) into its stage folder."""
    if shards < 1:
        raise CaiError(f"--shards must be at least 1, got {shards}")
    out.print(f"merged {shards} shards into {merge_stage(_run_config(config, set_), stage, shards)}")


@app.command()
def pm(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """RL-CAI: train the preference model on the soft AI labels."""
    _stage("pm", config, set_)


@app.command()
def ppo(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """RL-CAI: PPO of the SL-CAI policy against the preference model, KL to SL-CAI (section rl.ppo)."""
    _stage("ppo", config, set_)


@app.command()
def dpo(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """RL-CAI: DPO of the SL-CAI policy on the AI-labelled pairs (section rl.dpo)."""
    _stage("dpo", config, set_)


@app.command()
def rlhf(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Baseline: a preference model on human comparisons only, then the same PPO (or DPO) as RL-CAI (section rlhf)."""
    _stage("rlhf", config, set_)


@app.command()
def distill(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Baseline: fine-tune on the critic's own answers under the principles, no critique or revision (section distill)."""
    _stage("distill", config, set_)


@app.command()
def rloo(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """RL-CAI: RLOO (TRL) of the SL-CAI policy against the preference model, KL to SL-CAI (section rl.rloo)."""
    _stage("rloo", config, set_)


@app.command()
def grpo(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """RL-CAI: GRPO (TRL) of the SL-CAI policy against the preference model, KL to SL-CAI (section rl.grpo)."""
    _stage("grpo", config, set_)


@app.command()
def rl(
    algo: Annotated[Optional[str], typer.Option(
        help="ppo, dpo, rloo, grpo, several joined by commas (ppo,rloo) or both (= ppo,dpo); default: rl.algo.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """RL-CAI: the RL stages rl.algo picks (ppo, dpo, rloo, grpo: one or several), one after the other."""
    try:
        chosen = rl_algorithms(algo) if algo is not None else None
    except ValueError as err:
        raise CaiError(f"--algo: {err}") from err
    for name in chosen or _run_config(config, set_).rl.algo:
        _stage(name, config, set_)


@app.command("eval")
def eval_command(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Compare the run's models: pairwise AI-judged Elo, PM scores, evasiveness, revision curve."""
    _stage("eval", config, set_)


@config_app.command("show")
def config_show(
    section: Annotated[Optional[str], typer.Argument(help="A section such as critique or rl.ppo (default: all).")] = None,
) -> None:
    """Every config key of a run: type, default and what it means (what --help is for keys)."""
    from rich.table import Table

    table = Table(title=f"config keys{f' under {section}' if section else ''}")
    for column in ("key", "type", "default", "description"):
        table.add_column(column, overflow="fold")
    for row in describe_fields(RunConfig, section):
        table.add_row(row.key, row.type, row.default, row.description)
    out.print(table)


@app.command("mc-eval")
def mc_eval_command(
    files: Annotated[list[Path], typer.Argument(help='JSONL files of {"prompt", "corrects", "incorrects"} rows.')],
    model: ModelOpt = "bundled",
    cot: Annotated[bool, typer.Option("--cot", help="Chain of thought: judge pairs after reasoning.")] = False,
    constitution: Annotated[str, typer.Option(help="Constitution whose CoT examples to use.")] = "default",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results as JSON here.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
) -> None:
    """Accuracy of a model as a feedback model on multiple-choice files (HHH-alignment style)."""
    from cai.backends.hf import HFBackend  # lazy: imports torch (seconds); `cai --help` and the other commands must not wait for it
    data = {str(f): load_mc_file(f) for f in files}
    const = load_constitution(constitution) if cot else None
    backend = HFBackend.from_spec(model, batch_size=batch_size)
    results = [mc_eval(rows, backend, file=name, mode="cot" if cot else "plain", constitution=const)
               for name, rows in data.items()]
    for table in mc_tables(results, f"{model}: multiple-choice accuracy ({'cot' if cot else 'plain'})"):
        out.print(table)
    if output is not None:
        write_json_atomic(output, [{**r.summary(), "rows": r.rows} for r in results])
        out.print(f"results written to {output}")


@app.command("judge-check")
def judge_check(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    split: Annotated[str, typer.Option(help="Gold pairs to check on: dev (what auto chooses on), test or all.")] = "dev",
    limit: Annotated[Optional[int], typer.Option(help="At most N pairs, spread over kinds (default: label.gold_check).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: label.auto_methods), e.g. mc,votes.")] = None,
) -> None:
    """Each judging method's agreement with the human gold pairs, to choose a feedback model before a long run."""
    chosen = [m.strip() for m in methods.split(",")] if methods else None
    unknown = [m for m in chosen or [] if m not in ("mc", "mc-cot", "votes")]
    if unknown:
        raise CaiError(f"--methods: unknown method {unknown[0]!r}; choose from mc, mc-cot, votes")
    result = judge_check_table(_run_config(config, set_), split=split, limit=limit, methods=chosen)
    out.print(_method_table(result))
    best = result["best"]
    if best is None:
        out.print("no method could run on this feedback model")
    else:
        low = result["methods"][best]["all"]["ci"][0]
        out.print(f"best: {best}" if low > 0.5 else
                  f"no method clears chance: auto would label with the cheapest, {best}, and its labels would carry no signal")


def _method_table(result: dict) -> Table:
    table = Table(title=f"judging methods of {result['model']} on {result['pairs']} {result['split']} gold pairs")
    kinds = ["all", "harmful", "evasive", "unhelpful", "helpfulness"]
    for column in ["method", *kinds, "position bias", "trusted"]:
        table.add_column(column)
    for method, row in result["methods"].items():
        if "unsupported" in row:
            table.add_row(method, f"cannot run: {row['unsupported']}")
            continue
        cells = [fmt_ci(row[k]["agreement"], row[k]["ci"], percent=True) + f" (n={row[k]['pairs']})" if k in row else "-"
                 for k in kinds]
        table.add_row(method, *cells, f"{row['position_bias']:+.2f}" if row["position_bias"] is not None else "-",
                      "yes" if row["trusted"] else "no")
    return table


@app.command()
def gold(
    models: Annotated[list[str], typer.Argument(help="Models as NAME=SPEC or SPEC (the first is the baseline), e.g. base=bundled sft=runs/demo/sft.")],
    pairs: Annotated[str, typer.Option(help="'gold' (built in) or a gold-pairs JSONL file.")] = "gold",
    split: Annotated[str, typer.Option(help="dev, test or all.")] = "test",
    limit: Annotated[Optional[int], typer.Option(help="At most N pairs, spread over kinds.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Per-pair scores as JSONL (resumable).")] = None,
) -> None:
    """Judge-free: each model's own preference for the better answer on human-labelled gold pairs."""
    import tempfile

    from cai.eval import gold as G  # lazy: imports torch (seconds); `cai --help` and the other commands must not wait for it

    specs = dict(m.split("=", 1) if "=" in m else (m, m) for m in models)
    chosen = stratified(load_gold_pairs(pairs, None if split == "all" else split), limit)
    path = output or Path(tempfile.mkdtemp()) / "gold_scores.jsonl"
    for table in G.gold_tables(G.score_models(specs, chosen, path)):
        out.print(table)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="'bundled', a model folder (e.g. runs/demo/ppo), a .gguf file or a hub id.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    name: Annotated[Optional[str], typer.Option(help="Model name the API reports (default: the spec).")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="Require the bearer key held in this environment variable.")] = None,
    compile_decode: Annotated[bool, typer.Option(
        "--compile", help="Compile the decoding step for a lone or streamed request (static KV cache); each "
                          "256/512/1024... token window compiles once, on its first request.")] = False,
) -> None:
    """Serve a model over an OpenAI-compatible API (chat, completions, streaming, log-probs)."""
    import os

    from cai.serve.server import run_server  # lazy: imports torch (seconds); `cai --help` and the other commands must not wait for it

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise CaiError(f"environment variable {api_key_env} is not set")
    run_server(model, host=host, port=port, model_name=name, api_key=api_key, compile_decode=compile_decode)


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A model folder (e.g. runs/demo/sft), 'bundled' or a .gguf file.")],
    gguf: Annotated[Path, typer.Option("--gguf", help="The GGUF file to write (for llama.cpp, Ollama, LM Studio).")],
    tensor_type: Annotated[str, typer.Option("--type", help="f32, f16 or q8_0 for the matrices (norms stay f32).")] = "f16",
) -> None:
    """Write a model as one GGUF file: weights, tokenizer and chat template."""
    out.print(export_gguf(model, gguf, check_export_type(tensor_type)).summary(), markup=False)


@constitution_app.command("validate")
def constitution_validate(file: Annotated[str, typer.Argument(help="A YAML file or a built-in name.")]) -> None:
    """Check a constitution file; print a one-line summary or the first problem."""
    out.print(f"{file}: ok — {constitution_summary(load_constitution(file))}", markup=False)


@constitution_app.command("show")
def constitution_show(file: Annotated[str, typer.Argument(help="A YAML file or a built-in name.")]) -> None:
    """Print a constitution as readable tables."""
    show_constitution(load_constitution(file), out)


@data_app.command("show")
def data_show(
    source: Annotated[str, typer.Argument(help="red-team, helpfulness, a file, a saved dataset folder, or hf:NAME.")],
    n: Annotated[int, typer.Option(help="Rows to print.")] = 3,
) -> None:
    """Counts by category and split, and the first few rows of a prompt set."""
    show_prompts(source, out, n=n)


def main() -> None:
    """Console-script entry point: user mistakes exit with one sentence, not a traceback."""
    try:
        app()
    except CaiError as e:
        err.print(Text("error: ", style="bold red") + Text(str(e)), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
