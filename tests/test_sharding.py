"""Tests for cai.sharding: rows split across machines by id hash, and the shards' outputs merged."""

import json
import subprocess
import sys

import pytest

from cai.data.loaders import PromptRow
from cai.errors import CaiError
from cai.sharding import merge_shards, parse_shard, shard_of, shard_rows

IDS = [f"red-team-{i:04d}" for i in range(200)]
IDS_AS_ROWS = [{"id": i, "prompt": "p"} for i in IDS]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_shards_are_disjoint_and_cover_every_row(count):
    shards = [shard_rows(IDS_AS_ROWS, f"{i}/{count}") for i in range(count)]
    ids = [row["id"] for shard in shards for row in shard]
    assert sorted(ids) == sorted(IDS)  # every row once: disjoint and complete
    assert all(shard == sorted(shard, key=lambda r: IDS.index(r["id"])) for shard in shards)  # order kept
    if count > 1:  # a hash spreads 200 ids roughly evenly, never all on one machine
        assert all(len(shard) > 200 / count / 2 for shard in shards)


def test_objects_with_an_id_attribute_shard_like_dicts():
    rows = [PromptRow(id=i, messages=[{"role": "user", "content": "hi"}]) for i in IDS]
    for i in range(3):
        assert [r.id for r in shard_rows(rows, f"{i}/3")] == [r["id"] for r in shard_rows(IDS_AS_ROWS, f"{i}/3")]


def test_no_shard_means_every_row():
    assert shard_rows(iter(IDS_AS_ROWS), None) == IDS_AS_ROWS


def test_assignment_is_stable_across_calls_and_processes():
    first = [r["id"] for r in shard_rows(IDS_AS_ROWS, "1/4")]
    assert [r["id"] for r in shard_rows(list(reversed(IDS_AS_ROWS)), "1/4")] == list(reversed(first))
    # Another interpreter with a different string-hash seed (as on another machine) agrees.
    code = "from cai.sharding import shard_of; print([shard_of(f'red-team-{i:04d}', 4) for i in range(200)])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert json.loads(other.stdout) == [shard_of(i, 4) for i in IDS]
    # Pinned, so a change of hash (which would split a running job differently) fails here.
    assert [shard_of(i, 4) for i in IDS[:8]] == [2, 1, 1, 3, 3, 2, 3, 2]


@pytest.mark.parametrize("spec", ["", "1", "a/b", "1/", "/2", "2/2", "3/2", "0/0", "-1/2", "1/2/3", "1.0/2"])
def test_bad_shard_specs_fail_with_one_sentence(spec):
    with pytest.raises(CaiError, match=r"--shard .* (is not of the form i/N|is out of range)"):
        shard_rows(IDS_AS_ROWS, spec)


def test_shard_spec_parses_with_spaces():
    assert parse_shard(" 2 / 5 ") == (2, 5)


def test_a_row_without_an_id_is_named():
    with pytest.raises(CaiError, match="has no id"):
        shard_rows([{"prompt": "p"}], "0/2")


def write_rows(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_merge_dedupes_by_id_and_repairs_a_torn_last_line(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [{"id": "1", "v": "a"}, {"id": "2", "v": "a"}])
    b = write_rows(tmp_path / "b.jsonl", [{"id": "2", "v": "b"}, {"id": "3", "v": "b"}], tail='{"id": "4", "v"')
    out = tmp_path / "merged" / "data.jsonl"
    assert merge_shards([a, b], out) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"id": "1", "v": "a"}, {"id": "2", "v": "a"}, {"id": "3", "v": "b"}]  # first copy wins
    assert b.read_text().endswith('"v": "b"}\n')  # the torn row is cut off, so rerunning shard b redoes it


def test_merge_can_write_over_one_of_its_inputs(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [{"id": "1"}])
    b = write_rows(tmp_path / "b.jsonl", [{"id": "2"}, {"id": "1"}])
    assert merge_shards([a, b], a) == 2
    assert [json.loads(x)["id"] for x in a.read_text().splitlines()] == ["1", "2"]


def test_merging_sharded_rows_gives_back_every_row(tmp_path):
    paths = [write_rows(tmp_path / f"{i}.jsonl", shard_rows(IDS_AS_ROWS, f"{i}/3")) for i in range(3)]
    assert merge_shards(paths, tmp_path / "all.jsonl") == 200


def test_merge_names_a_missing_shard_and_a_row_without_id(tmp_path):
    with pytest.raises(CaiError, match="missing.jsonl does not exist"):
        merge_shards([tmp_path / "missing.jsonl"], tmp_path / "out.jsonl")
    bad = write_rows(tmp_path / "bad.jsonl", [{"x": 1}])
    with pytest.raises(CaiError, match="bad.jsonl holds a row without an id"):
        merge_shards([bad], tmp_path / "out.jsonl")
