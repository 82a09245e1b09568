"""data_tools: corpus import, tokenizers, documents -> shards -> text round trip, the CLI, build-default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.corpus import cap_bytes, deduplicate, iter_directory, iter_jsonl, iter_parquet, iter_text_files
from data_tools.tokenize_corpus import is_validation, tokenize_to_dataset
from mtp_pretrain.data import BPETokenizer, load_tokenizer
from mtp_pretrain.data.shards import SPLITS, read_metadata, token_dtype

REPO = Path(__file__).resolve().parents[1]

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.  Twice:  the quick brown fox.",
    "Ünïcödé — naïve café, 日本語のテキスト, emoji 🙂, tabs\tand\r\nCRLF.",
    "A document that mentions <|eos|> and <|pad|> literally must stay one document.",
    "   leading and trailing spaces   \n\n",
] + [f"Document number {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(200)]


def decoded_documents(path: Path, split: str) -> list[str]:
    """Read a split back from its shards and cut it at EOS into decoded documents."""
    meta = read_metadata(path)
    tok = load_tokenizer(path)
    tokens = np.concatenate([
        pa.ipc.open_file(pa.memory_map(str(path / s["file"]))).read_all().column(0).to_numpy()
        for s in meta["splits"][split]["shards"]
    ]) if meta["splits"][split]["shards"] else np.empty(0, np.uint16)
    assert tokens.dtype == np.dtype(meta["token_dtype"])
    cuts = np.flatnonzero(tokens == tok.eos_id)
    assert len(cuts) == meta["splits"][split]["num_documents"]
    assert len(tokens) == 0 or tokens[-1] == tok.eos_id  # every document ends with EOS
    return [tok.decode(doc) for doc in np.split(tokens, cuts + 1)[:-1]]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer.train(DOCS, vocab_size=400, show_progress=False).save(path)
    return path


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_round_trip_documents_shards_text(kind, bpe_file, byte_file, tmp_path):
    tok_file = bpe_file if kind == "bpe" else byte_file
    docs = [{"text": t, "source": f"d{i}"} for i, t in enumerate(DOCS)]
    meta = tokenize_to_dataset(docs, tok_file, tmp_path / "ds", source_description="test", shard_mb=0.002, val_fraction=0.1)
    assert len(meta["splits"]["train"]["shards"]) > 2  # small shards: documents span shard boundaries
    expected = {s: [t for t in DOCS if is_validation(t, 0.1) == (s == "val")] for s in SPLITS}
    assert expected["val"] and expected["train"]
    for split in SPLITS:
        assert decoded_documents(tmp_path / "ds", split) == expected[split]
    tok = load_tokenizer(tmp_path / "ds")
    assert meta["tokenizer"] == {"file": "tokenizer.json", "kind": tok.kind, "hash": tok.hash, "vocab_size": tok.vocab_size,
                                 "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                                 **{f"{r}_token": n for r, n in tok.role_tokens().items()}}
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == ((0, 1, 2) if kind == "bpe" else (256, 257, 258))


def test_parallel_tokenization_gives_the_same_dataset(bpe_file, tmp_path):
    docs = [{"text": t, "source": ""} for t in DOCS * 3]
    metas = [tokenize_to_dataset(docs, bpe_file, tmp_path / f"w{w}", source_description="t", workers=w,
                                 chunk_bytes=500, shard_mb=0.004) for w in (1, 2)]
    shards = [[(s["sha256"], s["num_tokens"]) for s in m["splits"]["train"]["shards"]] for m in metas]
    assert shards[0] == shards[1]


def test_token_dtype_by_vocab_size():
    assert token_dtype(259) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_bpe_specials_are_not_matched_inside_text(bpe_file):
    tok = load_tokenizer(bpe_file)
    ids = tok.encode("a <|eos|> b")
    assert tok.eos_id not in ids and tok.decode(ids) == "a <|eos|> b"


def test_import_directory_filters(tmp_path):
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("print('a')\n")
    (src / "pkg" / "b.py").write_text("print('a')\n")  # exact duplicate of a.py
    (src / "pkg" / "big.py").write_text("x = 1\n" * 2000)
    (src / "pkg" / "bin.py").write_bytes(b"\x00\x01binary")
    (src / "pkg" / "latin1.py").write_bytes(b"caf\xe9")
    (src / "pkg" / "notes.md").write_text("# notes\n")
    (src / "pkg" / "__pycache__" / "c.py").write_text("cached\n")
    docs = list(deduplicate(iter_directory(src, [".py"], max_file_bytes=1000)))
    assert [d["source"] for d in docs] == ["pkg/a.py"]
    assert {d["source"] for d in iter_directory(src, None, 1000)} == {"pkg/a.py", "pkg/b.py", "pkg/notes.md"}


def test_import_jsonl_parquet_text(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"content": t}) for t in ["one", "two", "one"]) + "\n")
    assert [d["text"] for d in deduplicate(iter_jsonl(tmp_path / "d.jsonl", "content"))] == ["one", "two"]
    pq.write_table(pa.table({"text": ["alpha", None, "beta"]}), tmp_path / "d.parquet")
    assert [d["text"] for d in iter_parquet(tmp_path / "d.parquet")] == ["alpha", "beta"]
    (tmp_path / "t.txt").write_text("plain prose\n")
    assert [d["text"] for d in iter_text_files([tmp_path / "t.txt"])] == ["plain prose\n"]
    assert len(list(cap_bytes(({"text": "x" * 10} for _ in range(100)), 35))) == 4


def run_cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(tmp_path):
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in DOCS) + "\n")
    r = run_cli("--help")
    assert r.returncode == 0 and all(sub in r.stdout for sub in ("import", "train-tokenizer", "tokenize", "inspect", "build-default"))
    r = run_cli("import", "--jsonl", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "docs.jsonl"))
    assert r.returncode == 0, r.stderr
    r = run_cli("train-tokenizer", "--docs", str(tmp_path / "docs.jsonl"), "--vocab-size", "300", "--out", str(tmp_path / "tok.json"))
    assert r.returncode == 0, r.stderr
    r = run_cli("tokenize", "--docs", str(tmp_path / "docs.jsonl"), "--tokenizer", str(tmp_path / "tok.json"),
                "--out", str(tmp_path / "ds"), "--workers", "1", "--val-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", str(tmp_path / "ds"))
    assert r.returncode == 0 and "verdict      OK" in r.stdout and "def add(a, b)" in r.stdout, r.stdout + r.stderr
    # a corrupted shard: inspect names it and fails
    shard = tmp_path / "ds" / "train-00000.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    r = run_cli("inspect", str(tmp_path / "ds"))
    assert r.returncode == 1 and "train-00000.arrow: SHA-256 checksum mismatch" in r.stdout


def test_build_default_small_and_idempotent(tmp_path):
    args = ("build-default", "--out", str(tmp_path / "d"), "--max-mb", "0.3", "--sample-mb", "0.3", "--vocab-size", "512", "--workers", "1")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    metas = {name: read_metadata(tmp_path / "d" / name) for name in ("code", "text")}
    assert metas["code"]["tokenizer"]["hash"] == metas["text"]["tokenizer"]["hash"]
    for meta in metas.values():
        assert meta["tokenizer"]["vocab_size"] == 512 and meta["splits"]["train"]["num_tokens"] > 10_000
        assert meta["splits"]["val"]["num_documents"] > 0
    assert "def " in load_tokenizer(tmp_path / "d" / "code").decode(
        pa.ipc.open_file(pa.memory_map(str(tmp_path / "d" / "code" / "train-00000.arrow"))).get_batch(0).column(0).to_numpy()[:2000])
    mtime = (tmp_path / "d" / "code" / "metadata.json").stat().st_mtime_ns
    r = run_cli(*args)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    assert (tmp_path / "d" / "code" / "metadata.json").stat().st_mtime_ns == mtime
    (tmp_path / "d" / "text" / "val-00000.arrow").unlink()  # an incomplete build is rebuilt
    r = run_cli(*args)
    assert r.returncode == 0 and "nothing to do" not in r.stdout and (tmp_path / "d" / "text" / "val-00000.arrow").exists()
