import json
import sysconfig
from pathlib import Path

import pytest

from zentrain.config import DataConfig
from zentrain.data.corpus import DataError, corpus_files, iter_documents, stdlib_files


def texts(files, **kw):
    return [d.text for d in iter_documents(files, **kw)]


def test_stdlib_default_corpus():
    files = corpus_files(DataConfig())
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files == stdlib_files() == sorted(files)
    assert len(files) > 500
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert root / "os.py" in files


def test_txt_and_jsonl_documents(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two\u2028x", "id": 3}) + "\n")
    files = corpus_files(DataConfig(paths=[str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")]))
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    assert texts(files) == ["hello\nworld\n", "one", "two\u2028x"]


def test_glob_dedup_and_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    (tmp_path / "d" / "y.txt").write_text("y")
    files = corpus_files(DataConfig(paths=[str(tmp_path / "d"), str(tmp_path / "d" / "*.txt")]))
    assert [f.name for f in files] == ["x.txt", "y.txt"]


@pytest.mark.parametrize("spec", ["nope.txt", "nope/*.jsonl"])
def test_missing_path_is_one_line_error(tmp_path, spec):
    missing = str(tmp_path / spec)
    with pytest.raises(DataError) as e:
        corpus_files(DataConfig(paths=[missing]))
    assert str(e.value) == f"data path not found: {missing}"


def test_invalid_utf8_is_replaced_not_fatal(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"caf\xe9 ok \xff\xfe end")
    [doc] = texts([p])
    assert doc == "caf\ufffd ok \ufffd\ufffd end"


def _jsonl_with_bad_line(tmp_path) -> Path:
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "good"}\n{"text": broken\n{"no_text": 1}\n{"text": "also good"}\n')
    return p


def test_jsonl_bad_lines_reported_and_skipped(tmp_path):
    p = _jsonl_with_bad_line(tmp_path)
    reports: list[str] = []
    assert texts([p], report=reports.append) == ["good", "also good"]
    assert len(reports) == 2
    assert reports[0].startswith(f"{p}:2: bad JSONL record")
    assert reports[1].startswith(f"{p}:3: bad JSONL record")


def test_jsonl_bad_line_fatal_when_asked(tmp_path):
    p = _jsonl_with_bad_line(tmp_path)
    with pytest.raises(DataError, match=f"{p}:2: bad JSONL record"):
        texts([p], on_error="fail")


def test_jsonl_bad_line_goes_to_the_log_by_default(tmp_path, caplog):
    p = _jsonl_with_bad_line(tmp_path)
    texts([p])
    assert f"{p}:2" in caplog.text


def test_max_bytes(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("0123456789")
    b.write_text("abcdefghij")
    assert texts([a, b], max_bytes=14) == ["0123456789", "abcd"]
    assert texts([a, b], max_bytes=10) == ["0123456789"]
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "aa"}\n{"text": "bb"}\n')
    # A cut through a JSONL record drops the partial record instead of reporting it bad.
    reports: list[str] = []
    assert texts([j], max_bytes=20, report=reports.append) == ["aa"]
    assert reports == []
