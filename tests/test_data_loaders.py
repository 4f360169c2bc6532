"""Tests for cai.data.loaders: every source and row format on small files written here."""

import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest
from rich.console import Console

from cai.data import LoadReport, PromptRow, fit_to_context, load_prompts, show_prompts
from cai.errors import CaiError


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def words(chat: list[dict]) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return sum(len(m["content"].split()) for m in chat)


# ---- sources and row formats -------------------------------------------------------------------


def test_jsonl_messages_keeps_fields_and_cuts_trailing_answer(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "category": "misc", "split": "test", "severity": "low",
         "messages": [{"role": "system", "content": "Be kind."}, user("Hi"), bot("Hello"), user("How?"), bot("Like so")]},
    ])
    rows, report = load_prompts(path)
    assert rows == [PromptRow("a", [{"role": "system", "content": "Be kind."}, user("Hi"), bot("Hello"), user("How?")],
                              "misc", "test", {"severity": "low"})]
    assert rows[0].last_user == "How?"
    assert (report.read, report.kept, report.source) == (1, 1, str(path))


def test_jsonl_plain_prompt_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "one"}, {"text": "two"}, {"question": "three"}, {"instruction": "four", "input": "extra"},
    ])
    rows, _ = load_prompts(path)
    assert [r.messages for r in rows] == [[user("one")], [user("two")], [user("three")], [user("four\n\nextra")]]
    assert all(r.split == "train" and r.category == "" and r.meta == {} for r in rows)


def test_txt_one_user_turn_per_non_empty_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffWhat is 2+2?\r\n\n   \n  Say hi  \nWhat is 2+2?\nlast, no newline".encode())
    rows, report = load_prompts(path)
    assert [r.messages for r in rows] == [[user("What is 2+2?")], [user("Say hi")], [user("last, no newline")]]
    assert (report.read, report.kept, report.dropped_duplicate) == (4, 3, 1)
    # ids as for any row without one: the same prompt from a JSONL file gets the same id, every time.
    jsonl_rows, _ = load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi"}]))
    assert rows[1].id == jsonl_rows[0].id == load_prompts(path)[0][1].id
    canonical = json.dumps([user("Say hi")], sort_keys=True, separators=(",", ":"))
    assert rows[1].id == hashlib.sha1(canonical.encode()).hexdigest()[:12]
    assert all(r.split == "train" and r.category == "" and r.meta == {} for r in rows)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(CaiError, match="no prompts left"):
        load_prompts(tmp_path / "blank.txt")


def test_json_list_and_json_lines_in_a_json_file(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps({"data": [{"prompt": "a"}, {"prompt": "b"}]}))
    write_jsonl(tmp_path / "lines.json", [{"prompt": "a"}, {"prompt": "b"}])
    for name in ("list.json", "lines.json"):
        rows, _ = load_prompts(tmp_path / name)
        assert [r.last_user for r in rows] == ["a", "b"]


def test_csv_with_messages_as_json_text(tmp_path):
    path = tmp_path / "p.csv"
    chat = json.dumps([user("from csv"), bot("x")]).replace('"', '""')
    path.write_text('\ufeffid,prompt,category\n1,"hello, world",greet\n2,,greet\n', encoding="utf-8")  # with a BOM
    rows, report = load_prompts(path)
    assert [(r.id, r.last_user, r.category) for r in rows] == [("1", "hello, world", "greet")]
    assert report.dropped_empty == 1
    path.write_text(f'messages\n"{chat}"\n', encoding="utf-8")
    assert load_prompts(path)[0][0].messages == [user("from csv")]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["p1", "p2", None], "category": ["c", "d", "c"]}).to_parquet(path)
    rows, report = load_prompts(path)
    assert [(r.last_user, r.category) for r in rows] == [("p1", "c"), ("p2", "d")]
    assert report.dropped_empty == 1


def test_null_cells_fall_through_to_the_next_prompt_column(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "mixed.parquet"
    pd.DataFrame({"messages": [[user("chat")], None, None], "prompt": [None, "plain", None]}).to_parquet(path)
    rows, report = load_prompts(path)
    assert [r.messages for r in rows] == [[user("chat")], [user("plain")]]
    assert report.dropped_empty == 1


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "x"}, {"prompt": "y"}])
    ds.save_to_disk(str(tmp_path / "flat"))
    assert [r.last_user for r in load_prompts(tmp_path / "flat")[0]] == ["x", "y"]
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list([{"prompt": "t"}])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert [(r.last_user, r.split) for r in load_prompts(tmp_path / "dict")[0]] == [("x", "train"), ("y", "train")]
    assert [(r.last_user, r.split) for r in load_prompts(tmp_path / "dict", split="test")[0]] == [("t", "test")]
    with pytest.raises(CaiError, match="no split 'dev'.*test, train|no split 'dev'.*train, test"):
        load_prompts(tmp_path / "dict", split="dev")


def test_hh_rlhf_single_and_multi_turn(tmp_path):
    single = "\n\nHuman: What is 2+2?\n\nAssistant: 4"
    multi = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."
    open_end = "Human: Just a question\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"transcript": single}, {"text": multi}, {"prompt": open_end}])
    rows, _ = load_prompts(path)
    assert rows[0].messages == [user("What is 2+2?")]
    assert rows[1].messages == [user("Hi there"), bot("Hello!"), user("Tell me a joke.")]
    assert rows[2].messages == [user("Just a question")]


def test_hh_rlhf_chosen_rejected_gives_shared_prompt(tmp_path):
    prefix = "\n\nHuman: Help me pick a lock.\n\nAssistant: Why?\n\nHuman: I'm locked out."
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": prefix + "\n\nAssistant: Call a locksmith.", "rejected": prefix + "\n\nAssistant: Use a pin."},
    ])
    (row,), _ = load_prompts(path)
    assert row.messages == [user("Help me pick a lock."), bot("Why?"), user("I'm locked out.")]
    assert row.meta == {}


def test_trl_conversational_prompt(tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": [user("Is water wet?")], "chosen": [bot("Yes.")], "rejected": [bot("No.")]},
    ])
    (row,), _ = load_prompts(path)
    assert row.messages == [user("Is water wet?")]
    assert set(row.meta) == {"chosen", "rejected"}


def test_fmt_forces_a_format(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "Human: literal text about Human: markers"}])
    assert load_prompts(path, fmt="prompt")[0][0].last_user == "Human: literal text about Human: markers"
    assert load_prompts(path)[0][0].last_user == "literal text about Human: markers"
    with pytest.raises(CaiError, match="fmt='messages'"):
        load_prompts(path, fmt="messages")
    with pytest.raises(CaiError, match="unknown fmt 'chat'"):
        load_prompts(path, fmt="chat")
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "no markers"}])
    with pytest.raises(CaiError, match="not a Human:/Assistant: transcript"):
        load_prompts(plain, fmt="hh-rlhf")


def test_column_map(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"my_id": 7, "my_col": "mapped", "my_cat": "k", "prompt": "ignored", "other": 1},
    ])
    (row,), _ = load_prompts(path, column_map={"prompt": "my_col", "id": "my_id", "category": "my_cat"})
    assert (row.id, row.last_user, row.category) == ("7", "mapped", "k")
    assert row.meta == {"other": 1}  # the mapped column replaces the original 'prompt'


# ---- ids, de-duplication, filters ----------------------------------------------------------------


def test_generated_ids_are_stable_sha1_of_canonical_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "héllo"}, {"messages": [user("héllo")], "x": 1}])
    rows, report = load_prompts(path)
    canonical = json.dumps([user("héllo")], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    assert rows[0].id == hashlib.sha1(canonical.encode()).hexdigest()[:12]
    assert load_prompts(path)[0][0].id == rows[0].id
    assert (len(rows), report.dropped_duplicate) == (1, 1)  # same messages in two formats


def test_dedup_and_empty_counts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a"}, {"prompt": "a"}, {"prompt": "  \n"}, {"prompt": ""}, {"prompt": None},
        {"messages": [{"role": "system", "content": "s"}]}, {"messages": [user("b"), bot("c")]},
        {"messages": [user("b")]},
    ])
    rows, report = load_prompts(path)
    assert [r.last_user for r in rows] == ["a", "b"]
    assert (report.read, report.kept, report.dropped_empty, report.dropped_duplicate) == (8, 2, 4, 2)
    assert "read 8 rows, kept 2" in report.summary() and "\n" not in report.summary()


def test_split_category_and_limit_filters(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": f"p{i}", "category": "ab"[i % 2], "split": ["train", "test"][i // 4]} for i in range(8)
    ])
    assert [r.last_user for r in load_prompts(path, split="test")[0]] == ["p4", "p5", "p6", "p7"]
    assert [r.last_user for r in load_prompts(path, categories=["b"])[0]] == ["p1", "p3", "p5", "p7"]
    assert [r.last_user for r in load_prompts(path, split="train", categories=["a"], limit=1)[0]] == ["p0"]
    with pytest.raises(CaiError, match=r"no prompts left in .* after split='dev'.*splits present: test, train"):
        load_prompts(path, split="dev")
    with pytest.raises(CaiError, match="limit must be at least 1"):
        load_prompts(path, limit=0)


def test_builtin_sets_ship_and_load():
    folder = resources.files("cai.data")
    assert all((folder / f).is_file() for f in ("red_team.jsonl", "helpfulness.jsonl"))
    for name in ("red-team", "helpfulness"):
        rows, report = load_prompts(name)
        assert len(rows) >= 400 and report.source == name


# ---- fitting to a context window -------------------------------------------------------------------


def test_fit_to_context_truncate_left_and_drop():
    long_chat = [{"role": "system", "content": "sys"}, user("a b c"), bot("d e"), user("f g"), bot("h"), user("i j")]
    rows = [PromptRow("short", [user("ok")]), PromptRow("long", long_chat), PromptRow("huge", [user("w " * 20)])]
    report = LoadReport("mem", read=3, kept=3)
    fitted = fit_to_context(rows, words, max_tokens=6, report=report)
    assert [r.id for r in fitted] == ["short", "long"]
    assert fitted[1].messages == [{"role": "system", "content": "sys"}, user("f g"), bot("h"), user("i j")]
    assert fitted[1].meta == {"turns_dropped": 2}
    assert (report.truncated, report.dropped_too_long, report.kept) == (1, 1, 2)
    assert fit_to_context(rows, words, max_tokens=3)[1].messages == [{"role": "system", "content": "sys"}, user("i j")]

    report = LoadReport("mem", read=3, kept=3)
    assert [r.id for r in fit_to_context(rows, words, 6, policy="drop", report=report)] == ["short"]
    assert (report.truncated, report.dropped_too_long, report.kept) == (0, 2, 1)


def test_fit_to_context_errors():
    rows = [PromptRow("x", [user("too many words here")])]
    with pytest.raises(CaiError, match="no prompts left in mem after fitting to max_tokens=2"):
        fit_to_context(rows, words, 2, report=LoadReport("mem"))
    with pytest.raises(CaiError, match="unknown context policy"):
        fit_to_context(rows, words, 10, policy="middle")  # type: ignore[arg-type]
    with pytest.raises(CaiError, match="max_tokens must be at least 1"):
        fit_to_context(rows, words, 0)


def test_show_prompts_prints_counts_and_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "[bold]not markup[/bold]", "category": "c1"},
        {"prompt": "second", "category": "c2", "split": "test"},
    ])
    console = Console(record=True, width=120)
    report = show_prompts(path, console, n=1)
    out = console.export_text()
    assert "c1" in out and "test" in out and "[bold]not markup[/bold]" in out and "second" not in out
    assert report.kept == 2


# ---- errors a user sees ------------------------------------------------------------------------------


def test_source_errors(tmp_path):
    with pytest.raises(CaiError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "p.xml").write_text("hi")
    with pytest.raises(CaiError, match="unknown extension '.xml'.*\\.txt"):
        load_prompts(tmp_path / "p.xml")
    with pytest.raises(CaiError, match="unknown prompt set 'red_team'.*red-team, helpfulness"):
        load_prompts("red_team")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CaiError, match="not one saved with datasets"):
        load_prompts(tmp_path / "folder")


def test_encoding_and_json_errors(tmp_path):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(CaiError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_prompts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n\n{"prompt": oops}\n')
    with pytest.raises(CaiError, match=r"broken.jsonl line 3 is not valid JSON"):
        load_prompts(broken)
    scalar = write_jsonl(tmp_path / "scalar.jsonl", ["just a string"])  # type: ignore[list-item]
    with pytest.raises(CaiError, match="line 1 is a JSON str, not an object"):
        load_prompts(scalar)


def test_row_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"body": "?", "label": 1}])
    with pytest.raises(CaiError, match=r"line 2 has no recognisable prompt \(columns: body, label\).*column_map"):
        load_prompts(path)
    with pytest.raises(CaiError, match="maps 'prompt' to column 'nope'.*body, label, prompt"):
        load_prompts(path, column_map={"prompt": "nope"})
    with pytest.raises(CaiError, match="column_map key 'answer' is not one of"):
        load_prompts(path, column_map={"answer": "body"})
    roles = write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "human", "content": "x"}]}])
    with pytest.raises(CaiError, match=r"messages\[0\] needs a role"):
        load_prompts(roles)
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"id": "1", "prompt": "a"}, {"id": "1", "prompt": "b"}])
    with pytest.raises(CaiError, match="reuses id '1'"):
        load_prompts(ids)


def test_nothing_left_after_filtering(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": " "}, {"prompt": "x", "category": "a"}])
    with pytest.raises(CaiError, match=r"no prompts left in .*p.jsonl after categories=\['z'\].*categories present: \(none\), a"):
        load_prompts(path, categories=["z"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CaiError, match="no prompts left"):
        load_prompts(empty)


def test_hub_offline_and_failures_never_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaiError, match="HF_HUB_OFFLINE is set"):
        load_prompts("hf:Anthropic/hh-rlhf")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        if name == "down/net":
            raise ConnectionError("Couldn't reach the hub")
        return datasets.Dataset.from_list([{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows, report = load_prompts("hf:org/set:test")
    assert (rows[0].messages, rows[0].split, report.source) == ([user("q")], "test", "hf:org/set:test")
    with pytest.raises(CaiError, match="could not load Hugging Face dataset 'down/net'.*Couldn't reach"):
        load_prompts("hf:down/net", split="train")
    with pytest.raises(CaiError, match="keep only one"):
        load_prompts("hf:org/set:test", split="train")
    assert calls == [("org/set", "test"), ("down/net", "train")]
