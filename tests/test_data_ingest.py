"""`tokenize --input`: Parquet directories, .jsonl.zst globs, .txt.gz, save_to_disk directories and
http URLs; parallel workers; resume after SIGKILL; partitions + merge; exact dedup."""

from __future__ import annotations

import bz2
import functools
import gzip
import http.server
import json
import lzma
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_tools.ingest import WORK_DIR, merge_partitions, tokenize_inputs
from mtp_pretrain.data import BPETokenizer, load_tokenizer
from mtp_pretrain.data.errors import DataError
from mtp_pretrain.data.shards import SPLITS, read_metadata

REPO = Path(__file__).resolve().parents[1]


def texts(prefix: str, n: int) -> list[str]:
    return [f"{prefix} document {i}: " + "naïve words flow 🙂 " * (i % 5 + 1) + f"\nend {i}" for i in range(n)]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer.train(texts("train", 200), vocab_size=400, show_progress=False).save(path)
    return path


def stream(path: Path, split: str = "train") -> np.ndarray:
    meta = read_metadata(path)
    parts = [pa.ipc.open_file(pa.memory_map(str(path / s["file"]))).read_all().column(0).to_numpy()
             for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.empty(0, np.uint16)


def documents(path: Path, split: str = "train") -> list[str]:
    tok, tokens = load_tokenizer(path), stream(path, split)
    cuts = np.flatnonzero(tokens == tok.eos_id)
    return [tok.decode(d) for d in np.split(tokens, cuts + 1)[:-1]]


def shard_hashes(path: Path) -> list[tuple[str, str]]:
    meta = read_metadata(path)
    return [(s["file"], s["sha256"]) for split in SPLITS for s in meta["splits"][split]["shards"]]


def jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)).encode()


@pytest.fixture
def http_root(tmp_path):
    """A local http server over tmp_path/www: the URL case without the network."""
    root = tmp_path / "www"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_every_input_kind_round_trips(tok_file, tmp_path, http_root):
    datasets = pytest.importorskip("datasets")
    expected = []
    pq_dir = tmp_path / "parquet"
    pq_dir.mkdir()
    for k in range(2):  # a directory of Parquet files, read in name order
        docs = texts(f"parquet{k}", 15)
        pq.write_table(pa.table({"content": docs, "n": list(range(15))}), pq_dir / f"part-{k}.parquet")
        expected += docs
    zst_docs = []
    for k in range(3):  # a glob of .jsonl.zst
        docs = texts(f"zst{k}", 10)
        (tmp_path / f"shard-{k}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"content": t}) + "\n" for t in docs).encode()))
        zst_docs += docs
    expected += zst_docs
    txt = "A whole plain-text file is one document.\nLine two — ünïcödé.\n"
    (tmp_path / "book.txt.gz").write_bytes(gzip.compress(txt.encode()))
    expected.append(txt)
    hf_docs = texts("arrow", 12)
    datasets.Dataset.from_dict({"content": hf_docs}).save_to_disk(str(tmp_path / "hf_saved"))
    expected += hf_docs
    root, base = http_root
    url_docs = texts("http", 9)
    (root / "remote.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"content": t}) + "\n" for t in url_docs).encode()))
    expected += url_docs
    xz_docs, bz_text = texts("xz", 4), "bz2 compressed text document"
    (tmp_path / "extra.jsonl.xz").write_bytes(lzma.compress(
        "".join(json.dumps({"content": t}) + "\n" for t in xz_docs).encode()))
    (tmp_path / "note.txt.bz2").write_bytes(bz2.compress(bz_text.encode()))
    expected += xz_docs + [bz_text]

    inputs = [str(pq_dir), str(tmp_path / "shard-*.jsonl.zst"), str(tmp_path / "book.txt.gz"),
              str(tmp_path / "hf_saved"), f"{base}/remote.jsonl.gz", str(tmp_path / "extra.jsonl.xz"),
              str(tmp_path / "note.txt.bz2")]
    meta = tokenize_inputs(inputs, tok_file, tmp_path / "ds", text_field="content", val_fraction=0.0, shard_mb=0.002)
    assert len(meta["splits"]["train"]["shards"]) > 1 and meta["num_inputs"] == 2 + 3 + 1 + 1 + 1 + 1 + 1
    assert documents(tmp_path / "ds") == expected
    assert not (tmp_path / "ds" / WORK_DIR).exists()


def make_inputs(tmp_path: Path, n_files: int, docs_per_file: int, duplicate_every: int = 0) -> list[str]:
    d = tmp_path / "in"
    d.mkdir()
    for k in range(n_files):
        docs = texts(f"file{k}", docs_per_file)
        if duplicate_every and k % duplicate_every == 1:
            docs = docs[:3] + texts("file0", 5) + docs[3:]  # exact copies of another file's documents
        (d / f"part-{k:03d}.jsonl.gz").write_bytes(gzip.compress(jsonl(docs)))
    return [str(d / "*.jsonl.gz")]


def test_workers_do_not_change_the_shards(tok_file, tmp_path):
    inputs = make_inputs(tmp_path, 6, 20)
    metas = [tokenize_inputs(inputs, tok_file, tmp_path / f"w{w}", workers=w, shard_mb=0.002, val_fraction=0.1)
             for w in (1, 2)]
    assert metas[0]["splits"]["val"]["num_documents"] > 0
    assert shard_hashes(tmp_path / "w1") == shard_hashes(tmp_path / "w2") and len(shard_hashes(tmp_path / "w1")) > 3


def run_cli(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "data_tools", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_rerun_gives_identical_shards(tok_file, tmp_path):
    inputs = make_inputs(tmp_path, 40, 150)
    args = ["tokenize", "--input", inputs[0], "--tokenizer", str(tok_file), "--out", str(tmp_path / "killed"),
            "--workers", "1", "--shard-mb", "0.02", "--val-fraction", "0.05"]
    proc = run_cli(*args)
    work = tmp_path / "killed" / WORK_DIR
    deadline = time.time() + 120
    while len(list(work.glob("*.done"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finished = len(list(work.glob("*.done")))
    assert proc.returncode == -signal.SIGKILL and 3 <= finished < 40, f"killed after {finished} of 40 inputs"
    assert not (tmp_path / "killed" / "metadata.json").exists()
    rerun = run_cli(*args)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"resuming: {finished} of 40 inputs already tokenized" in out
    assert "100%" in err and "B/s" in err  # progress in input bytes with a rate, to the end
    tokenize_inputs(inputs, tok_file, tmp_path / "straight", shard_mb=0.02, val_fraction=0.05)
    assert shard_hashes(tmp_path / "killed") == shard_hashes(tmp_path / "straight")
    assert len(shard_hashes(tmp_path / "straight")) > 10


def test_three_partitions_merged_equal_one_run(tok_file, tmp_path):
    inputs = make_inputs(tmp_path, 7, 20)
    one = tokenize_inputs(inputs, tok_file, tmp_path / "one", shard_mb=0.005, val_fraction=0.1)
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, p in enumerate(parts):
        tokenize_inputs(inputs, tok_file, p, shard_mb=0.005, val_fraction=0.1, num_partitions=3, partition=i)
    assert {read_metadata(p)["num_inputs"] for p in parts} == {2, 3}
    merged = merge_partitions([parts[2], parts[0], parts[1]], tmp_path / "merged")  # any order: by index
    for split in SPLITS:
        assert np.array_equal(stream(tmp_path / "merged", split), stream(tmp_path / "one", split))
        assert merged["splits"][split]["num_documents"] == one["splits"][split]["num_documents"] > 0
    assert load_tokenizer(tmp_path / "merged").hash == load_tokenizer(tmp_path / "one").hash
    with pytest.raises(DataError, match="expected each partition 0..N-1 exactly once"):
        merge_partitions([parts[0], parts[2]], tmp_path / "bad")


def test_dedup_keeps_the_first_copy(tok_file, tmp_path):
    inputs = make_inputs(tmp_path, 5, 8, duplicate_every=2)  # files 1 and 3 repeat 5 of file 0's documents
    meta = tokenize_inputs(inputs, tok_file, tmp_path / "ds", val_fraction=0.0, dedup=True)
    assert meta["duplicates_removed"] == 10
    expected = [t for k in range(5) for t in texts(f"file{k}", 8)]
    assert documents(tmp_path / "ds") == expected


def test_missing_text_field_names_the_line(tok_file, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"a.jsonl:2: no field 'text' \(has \['body'\]\); pass --text-field"):
        tokenize_inputs([str(tmp_path / "a.jsonl")], tok_file, tmp_path / "ds")
    with pytest.raises(DataError, match=r"nothing-here\*: no input files found"):
        tokenize_inputs([str(tmp_path / "nothing-here*")], tok_file, tmp_path / "ds2")
