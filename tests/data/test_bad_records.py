"""Bad records in cached data: kept in the cache, applied per run's on_error, said once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zentrain.config import Config, SourceConfig
from zentrain.data import badrecords, build_loader
from zentrain.data.corpus import DataError

WORDS = "def class return self import lambda yield value index tensor gradient".split()


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "txt").mkdir()
    for i in range(10):
        (tmp_path / "txt" / f"d{i}.txt").write_text(
            "\n".join(" ".join(WORDS[(i + j + k) % len(WORDS)] for k in range(8))
                      for j in range(20)))
    with open(tmp_path / "web.jsonl", "w") as f:
        for i in range(60):
            if i in (20, 41):
                f.write('{"text": broken\n' if i == 20 else '["not an object"]\n')
            f.write(json.dumps({"text": " ".join(WORDS[(i * k) % len(WORDS)]
                                                 for k in range(30))}) + "\n")
    return tmp_path


def cfg(root: Path, mix: bool, on_error: str = "skip", cache: str = "cache") -> Config:
    c = Config()
    c.data.cache_dir = str(root / cache)
    c.data.num_workers = 0
    c.data.on_error = on_error
    web = str(root / "web.jsonl")
    if mix:  # the mix- cache: several sources, one tokenizer
        c.data.sources = [SourceConfig(path=str(root / "txt" / "*.txt"), name="code"),
                          SourceConfig(path=web, name="web")]
    else:  # one source by suffix: the foundation's gpt- cache
        c.data.paths = [web]
    c.model.vocab_size = 300
    c.model.seq_len = 16
    c.train.batch_size = 4
    c.train.eval_batches = 1
    c.metrics.progress = False
    return c


def metas(root: Path, cache: str = "cache") -> list[Path]:
    return sorted((root / cache).glob("*/meta.json"))


@pytest.mark.parametrize("mix", [False, True], ids=["one-source", "mix"])
def test_a_cache_built_skipping_fails_a_fail_run_as_a_fresh_read_does(corpus, caplog, mix):
    with pytest.raises(DataError) as fresh:  # the reference: a fail run on no cache
        build_loader(cfg(corpus, mix, "fail", cache="fresh"), 0, 1, True)
    assert str(fresh.value).startswith(f"{corpus / 'web.jsonl'}:21: bad JSONL record")
    assert metas(corpus, "fresh") == []  # nothing cached by the failed build
    build_loader(cfg(corpus, mix), 0, 1, True)
    [meta] = metas(corpus)
    assert json.loads(meta.read_text())["n_bad"] == 2
    built = meta.stat().st_mtime_ns
    with pytest.raises(DataError) as cached:
        build_loader(cfg(corpus, mix, "fail"), 0, 1, True)
    assert str(cached.value) == str(fresh.value)
    with pytest.raises(DataError):  # every rank fails alike, the non-builders too
        build_loader(cfg(corpus, mix, "fail"), 1, 2, False)
    assert metas(corpus) == [meta] and meta.stat().st_mtime_ns == built  # reused, not rebuilt


@pytest.mark.parametrize("mix", [False, True], ids=["one-source", "mix"])
def test_bad_records_are_said_once_per_process_and_again_by_a_later_run(corpus, caplog, mix):
    line21, line43 = f"{corpus / 'web.jsonl'}:21: bad", f"{corpus / 'web.jsonl'}:43: bad"
    build_loader(cfg(corpus, mix), 0, 1, True)
    log = caplog.text
    assert log.count(line21) == 1 and log.count(line43) == 1
    assert log.count("2 bad records skipped (data.on_error = 'skip'; listed above)") == 1
    caplog.clear()
    build_loader(cfg(corpus, mix), 0, 1, True)  # reopened by the same process
    build_loader(cfg(corpus, mix), 1, 2, False)  # a non-builder rank
    assert caplog.text == ""
    badrecords.forget()  # a later run: a new process tree, the cache reused
    build_loader(cfg(corpus, mix), 0, 1, True)
    log = caplog.text
    assert log.count(line21) == 1 and log.count(line43) == 1 and "listed above" in log


def test_a_cache_keeps_the_first_records_and_counts_all(corpus, caplog, monkeypatch):
    monkeypatch.setattr(badrecords, "MAX_KEPT", 1)
    build_loader(cfg(corpus, False), 0, 1, True)
    meta = json.loads(metas(corpus)[0].read_text())
    assert meta["n_bad"] == 2 and [b["line"] for b in meta["bad"]] == [21]
    assert "2 bad records skipped (data.on_error = 'skip'; the first 1 listed above)" \
        in caplog.text
    assert ":43: bad" not in caplog.text


_CHILD = """
import logging, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_bad_records import cfg
from zentrain.data import build_loader
logging.basicConfig(level=logging.WARNING, format="%(message)s")
build_loader(cfg(Path({root!r}), False), 0, 1, True)
"""


def test_a_process_started_by_the_lister_only_counts(corpus, caplog):
    """``zentrain run``: the launcher checks the data, then starts the trainer ranks."""
    build_loader(cfg(corpus, False), 0, 1, True)
    assert f"{corpus / 'web.jsonl'}:21: bad" in caplog.text
    assert os.environ.get(badrecords.REPORTED_ENV)  # what the ranks it starts inherit
    src = str(Path(badrecords.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": src}
    code = _CHILD.format(tests=str(Path(__file__).parent), root=str(corpus))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ":21: bad" not in out.stderr
    assert ("2 bad records skipped (data.on_error = 'skip'; listed by the process that "
            "started this one)") in out.stderr
