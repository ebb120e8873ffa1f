"""Text and JSONL are read in bounded pieces, with the documents and tokens of a whole read."""

import json
import sysconfig
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from zentrain.data.corpus import Document, iter_documents
from zentrain.data.text import encode_corpus
from zentrain.data.tokenizer import EOT, train_tokenizer


def whole_file_documents(files, max_bytes=0):
    """The reader as it was before streaming: every file read whole (the reference)."""
    budget = max_bytes if max_bytes > 0 else None
    for path in files:
        if budget is not None and budget <= 0:
            return
        data = path.read_bytes()
        if budget is not None and len(data) > budget:
            data = data[:budget]
            if path.suffix == ".jsonl":
                data = data[:data.rfind(b"\n") + 1]
        text = data.decode("utf-8", errors="replace")
        if path.suffix == ".jsonl":
            for line in text.split("\n"):
                try:
                    obj = json.loads(line) if line.strip() else None
                except ValueError:
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                    yield obj["text"]
        elif text:
            yield text
        if budget is not None:
            budget -= len(data)


def joined(docs: list[Document]) -> list[str]:
    """Pieces glued back into documents (and every document ends once)."""
    out, cur = [], []
    for d in docs:
        cur.append(d.text)
        if d.end:
            out.append("".join(cur))
            cur = []
    assert not cur, "the last piece of a document must end it"
    return out


@pytest.fixture
def files(tmp_path) -> list[Path]:
    std = Path(sysconfig.get_paths()["stdlib"])
    a = tmp_path / "a.txt"  # real code, some non-ASCII, runs of blank lines and indents
    a.write_bytes((std / "textwrap.py").read_bytes() + "\n\n  héllo wörld ✓  \n".encode()
                  + (std / "string.py").read_bytes())
    b = tmp_path / "b.txt"  # invalid UTF-8 around newlines and spaces, no final newline
    b.write_bytes(b"caf\xe9 ok\n\xff\xfe end \xe2\x82\n" * 40 + b"tail\xe2")
    c = tmp_path / "c.jsonl"  # bad lines, CRLF, U+2028 inside a string, no final newline
    c.write_bytes(b'{"text": "one"}\r\n{"text": broken\n\n'
                  + json.dumps({"text": "two\u2028x"}).encode() + b"\n[1]\n"
                  + json.dumps({"text": "three " * 50}).encode())
    d = tmp_path / "d.txt"  # no whitespace at all: cut at a character boundary
    d.write_text("é" * 3000 + "x" * 1001)
    return [a, b, c, d]


@pytest.mark.parametrize("chunk", [7, 100, 4096, 1 << 20])
@pytest.mark.parametrize("max_bytes", [0, 1000, 30_000, 40_100])
def test_pieces_join_into_the_whole_file_documents(files, chunk, max_bytes):
    docs = list(iter_documents(files, max_bytes, report=None, chunk=chunk))
    assert joined(docs) == list(whole_file_documents(files, max_bytes))
    pieces = [d for d in iter_documents([f for f in files if f.suffix == ".txt"],
                                        report=None, chunk=chunk)]
    assert max(d.nbytes for d in pieces) < 2 * chunk + 4  # read in bounded pieces


def test_tokens_of_pieces_equal_tokens_of_the_whole_file(files, tmp_path):
    tok = train_tokenizer((Document(t, len(t)) for t in whole_file_documents(files)), 600,
                          0, progress=False)
    eot = tok.token_to_id(EOT)
    want = []
    for t in whole_file_documents(files):  # the cache as the whole-file reader built it
        want += tok.encode(t, add_special_tokens=False).ids + [eot]
    for chunk in (64, 1000):
        out = tmp_path / f"tokens-{chunk}.bin"
        meta = encode_corpus(tok, iter_documents(files, report=None, chunk=chunk), out, 0,
                             progress=False)
        got = np.fromfile(out, dtype=meta["dtype"]).tolist()
        # d.txt has no whitespace: its forced cuts may tokenize differently; all else exact.
        n_exact = len(want) - len(tok.encode(files[3].read_text(),
                                             add_special_tokens=False).ids) - 1
        assert got[:n_exact] == want[:n_exact], f"chunk {chunk}"
        assert meta["n_docs"] == len(list(whole_file_documents(files)))


def test_whole_file_tokens_exact_when_every_chunk_has_a_cut(files, tmp_path):
    tok = train_tokenizer((Document(t, len(t)) for t in whole_file_documents(files[:3])), 600,
                          0, progress=False)
    want = []
    for t in whole_file_documents(files[:3]):
        want += tok.encode(t, add_special_tokens=False).ids + [tok.token_to_id(EOT)]
    out = tmp_path / "tokens.bin"
    meta = encode_corpus(tok, iter_documents(files[:3], report=None, chunk=97), out, 0,
                         progress=False)
    assert np.fromfile(out, dtype=meta["dtype"]).tolist() == want


def _peak_while_reading(files, chunk) -> tuple[int, int]:
    tracemalloc.start()
    try:
        biggest = 0
        for doc in iter_documents(files, report=None, chunk=chunk):
            biggest = max(biggest, len(doc.text))
        return tracemalloc.get_traced_memory()[1], biggest
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded_for_files_much_larger_than_a_chunk(tmp_path):
    chunk = 256 << 10
    big_txt = tmp_path / "big.txt"
    line = ("lorem ipsum dolor sit amet, " * 40 + "\n").encode()
    with open(big_txt, "wb") as f:
        for _ in range((24 << 20) // len(line)):
            f.write(line)
    big_jsonl = tmp_path / "big.jsonl"
    with open(big_jsonl, "w") as f:
        for i in range((24 << 20) // 8000):
            f.write(json.dumps({"text": f"record {i} " + "x y " * 2000}) + "\n")
    for path in (big_txt, big_jsonl):
        assert path.stat().st_size > 90 * chunk
        peak, biggest = _peak_while_reading([path], chunk)
        # A whole-file read holds the bytes and the decoded text: > 2x the file.
        assert peak < 8 * chunk, (path.name, peak)
        assert biggest <= 2 * chunk
