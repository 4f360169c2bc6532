"""Tests for cai.io: atomic writes, torn-line repair, flushed appends and the errors a user sees."""

import errno
import json
import os
from pathlib import Path

import pytest

from cai.errors import CaiError
from cai.io import JsonlWriter, ensure_dir, iter_batches, read_jsonl, write_json_atomic, write_text_atomic


def lines_of(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out" / "config.yaml"  # the folder is created too
    write_text_atomic(path, "first\n")
    write_text_atomic(path, "second, ünïcode\n")
    assert path.read_text(encoding="utf-8") == "second, ünïcode\n"
    assert os.listdir(path.parent) == ["config.yaml"]

    write_json_atomic(tmp_path / "out" / "meta.json", {"n": 1, "name": "é"})
    assert json.loads((tmp_path / "out" / "meta.json").read_text(encoding="utf-8")) == {"n": 1, "name": "é"}
    assert sorted(os.listdir(path.parent)) == ["config.yaml", "meta.json"]


def test_failed_atomic_write_keeps_old_content_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "old\n")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CaiError, match="no space left.*summary.json"):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["summary.json"]


# ---- reading JSONL, with and without repair ----------------------------------------------------------------


def test_missing_file_reads_as_no_rows(tmp_path):
    assert read_jsonl(tmp_path / "nope.jsonl") == []
    assert read_jsonl(tmp_path / "nope.jsonl", repair=True) == []
    assert not (tmp_path / "nope.jsonl").exists()


def test_repair_cuts_a_torn_last_line_so_appends_make_a_clean_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    done = [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}]
    path.write_bytes(lines_of(done) + b'{"id": 3, "te')
    with pytest.raises(CaiError, match="line 3 is not valid JSON"):
        read_jsonl(path)  # without repair a torn line is an error, and the file is left alone
    assert path.read_bytes().endswith(b'"te')

    assert read_jsonl(path, repair=True) == done
    assert path.read_bytes() == lines_of(done)
    with JsonlWriter(path) as writer:
        writer.write({"id": 3, "text": "c"})
    assert path.read_bytes() == lines_of(done + [{"id": 3, "text": "c"}])
    assert read_jsonl(path) == done + [{"id": 3, "text": "c"}]


def test_repair_cuts_a_torn_line_followed_only_by_blank_lines_or_split_utf8(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(lines_of([{"id": 1}]) + b'{"id": 2, "x"\n\n')
    assert read_jsonl(path, repair=True) == [{"id": 1}]
    assert path.read_bytes() == lines_of([{"id": 1}])

    # a crash in the middle of a multi-byte character leaves invalid UTF-8 at the tail
    path.write_bytes(lines_of([{"id": 1}]) + '{"text": "é'.encode()[:-1])
    assert read_jsonl(path, repair=True) == [{"id": 1}]
    assert path.read_bytes() == lines_of([{"id": 1}])


def test_repair_adds_the_missing_newline_after_a_complete_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(lines_of([{"id": 1}]) + b'{"id": 2}')
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}]
    assert path.read_bytes().endswith(b"}")  # reading without repair never changes the file
    assert read_jsonl(path, repair=True) == [{"id": 1}, {"id": 2}]
    assert path.read_bytes() == lines_of([{"id": 1}, {"id": 2}])
    with JsonlWriter(path) as writer:
        writer.write({"id": 3})
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_malformed_middle_line_is_an_error_even_with_repair(tmp_path):
    path = tmp_path / "rows.jsonl"
    content = lines_of([{"id": 1}]) + b"{not json}\n" + lines_of([{"id": 3}])
    path.write_bytes(content)
    for repair in (False, True):
        with pytest.raises(CaiError, match=r"rows\.jsonl line 2 is not valid JSON"):
            read_jsonl(path, repair=repair)
    assert path.read_bytes() == content  # nothing was cut: the rows after it are real work

    path.write_bytes(lines_of([{"id": 1}]) + b"\xff\xfe\n" + lines_of([{"id": 3}]))
    with pytest.raises(CaiError, match="line 2"):
        read_jsonl(path, repair=True)


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\n{"id": 1}\n  \n{"id": 2}\n')
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}]


# ---- appending JSONL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", [True, False])
def test_writer_flushes_each_row_before_close(tmp_path, fsync):
    path = tmp_path / "deep" / "rows.jsonl"
    writer = JsonlWriter(path, fsync=fsync)
    writer.write({"id": 1, "text": "ü"})
    assert read_jsonl(path) == [{"id": 1, "text": "ü"}]
    writer.write_many([{"id": 2}, {"id": 3}])
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3]
    writer.close()
    assert JsonlWriter(path).path == path and len(read_jsonl(path)) == 3  # reopening appends, never truncates


def test_full_disk_is_a_clear_error_and_keeps_earlier_rows(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    with pytest.raises(CaiError, match="no space left on the device while writing .*rows.jsonl"):
        with JsonlWriter(path) as writer:
            writer.write({"id": 1})
            writer.write({"id": 2})
            monkeypatch.setattr(os, "fsync", no_space)
            writer.write({"id": 3})
    monkeypatch.undo()
    rows = read_jsonl(path, repair=True)
    assert rows[:2] == [{"id": 1}, {"id": 2}]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_on_the_write_itself_never_leaks_a_raw_oserror(tmp_path):
    # /dev/full fails every write with ENOSPC; the unwritten bytes stay buffered, so closing
    # the file fails again, and that too must reach the user as a CaiError.
    full = tmp_path / "rows.jsonl"
    full.symlink_to("/dev/full")
    with pytest.raises(CaiError, match="no space left"):
        with JsonlWriter(full, fsync=False) as writer:
            writer.write({"id": 1})


def test_writer_on_a_folder_says_it_cannot_open_it(tmp_path):
    (tmp_path / "rows.jsonl").mkdir()
    with pytest.raises(CaiError, match=r"could not open .*rows\.jsonl"):
        JsonlWriter(tmp_path / "rows.jsonl")


# ---- ensure_dir --------------------------------------------------------------------------------------------


def test_ensure_dir_creates_parents_and_accepts_existing(tmp_path):
    assert ensure_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert ensure_dir(str(tmp_path / "a" / "b")).is_dir()


def test_ensure_dir_on_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(CaiError, match="taken exists and is a file, not a folder"):
        ensure_dir(tmp_path / "taken")
    with pytest.raises(CaiError, match=r"could not create .*taken/sub"):
        ensure_dir(tmp_path / "taken" / "sub")  # a parent that is a file


# A read-only folder is simulated rather than made with chmod: root (as in CI) may write anywhere, and
# `ensure_dir` learns of a read-only folder only through `os.access` and `Path.mkdir`, faked below.


def test_ensure_dir_on_a_non_writable_folder_simulated(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(CaiError, match=r"output folder .*out is not writable"):
        ensure_dir(tmp_path / "out")


def test_ensure_dir_permission_denied_simulated(tmp_path, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(CaiError, match="permission denied while creating .*out; choose a writable output folder"):
        ensure_dir(tmp_path / "out")


def test_iter_batches():
    assert list(iter_batches([1, 2, 3, 4, 5], 2)) == [[1, 2], [3, 4], [5]]
    assert list(iter_batches([], 3)) == []
