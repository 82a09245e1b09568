"""Megatron indexed datasets <-> Arrow shards (data_tools/megatron.py, the two CLI subcommands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.megatron import export_megatron, import_megatron, read_index, split_documents
from mtp_pretrain.data.errors import DataError
from mtp_pretrain.data.shards import read_metadata
from mtp_pretrain.data.synthetic import write_random_dataset

REPO = Path(__file__).resolve().parent.parent


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools", *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, timeout=120)


def docs_of(dataset: Path, split: str) -> list[list[int]]:
    return [d.tolist() for d in split_documents(dataset, split)]


@pytest.fixture(scope="module")
def arrow_ds(tmp_path_factory) -> Path:
    """Documents of varying length that span shard boundaries (small shards)."""
    root = tmp_path_factory.mktemp("mg_arrow") / "ds"
    # whole documents (as `tokenize` writes them: each ends with EOS); 1000-token shards cut documents
    write_random_dataset(root, {"train": 137 * 36, "val": 137 * 6}, doc_len=137, seed=3, shard_tokens=1_000)
    return root


def test_round_trip_cli_identical_documents(arrow_ds, byte_file, tmp_path):
    p = cli("export-megatron", arrow_ds, "--out", tmp_path / "mg", "--split", "all")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "mg_train.bin").is_file() and (tmp_path / "mg_val.idx").is_file()
    p = cli("import-megatron", tmp_path / "mg_train", "--val-prefix", tmp_path / "mg_val",
            "--tokenizer", byte_file, "--out", tmp_path / "back")
    assert p.returncode == 0, p.stderr
    for split in ("train", "val"):
        a, b = docs_of(arrow_ds, split), docs_of(tmp_path / "back", split)
        assert len(a) > 5 and a == b
    meta = read_metadata(tmp_path / "back")
    assert meta["tokenizer"]["vocab_size"] == 259 and meta["splits"]["train"]["num_documents"] == len(a := docs_of(arrow_ds, "train"))
    assert meta["splits"]["train"]["num_tokens"] == sum(map(len, a))
    # and the imported dataset trains: the stream opens it
    from mtp_pretrain.data import ArrowTokenStream, DataSource

    stream = ArrowTokenStream(sources=[DataSource(path=str(tmp_path / "back"), weight=1.0)], window=33,
                              micro_batch_size=2, seed=0, split="train", prefetch=0, infinite=False)
    assert next(iter(stream)).shape == (2, 33)
    # ...and `inspect` reads it (no raw-text size: it was imported from token files)
    p = cli("inspect", tmp_path / "back")
    assert p.returncode == 0 and "train" in p.stdout, p.stderr


def test_megatron_core_reads_export(arrow_ds, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    export_megatron(arrow_ds, tmp_path / "mg", "train")
    ds = IndexedDataset(str(tmp_path / "mg"))
    ours = docs_of(arrow_ds, "train")
    assert len(ds) == len(ours)
    assert all(ds[i].tolist() == ours[i] for i in range(len(ours)))
    assert ds.index.dtype == np.uint16 and list(ds.document_indices) == list(range(len(ours) + 1))


def test_import_megatron_core_written_multi_sequence_documents(byte_file, tmp_path):
    """Megatron's own builder, documents of several sequences, some without EOD."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    expected = []
    for d in range(12):
        seqs = [rng.integers(0, 256, size=int(rng.integers(1, 40))) for _ in range(int(rng.integers(1, 4)))]
        if d % 2:
            seqs[-1] = np.append(seqs[-1], 258)  # already ends with EOS
        for s in seqs:
            builder.add_item(torch.from_numpy(s.astype(np.int64)))
        builder.end_document()
        doc = np.concatenate(seqs).tolist()
        expected.append(doc if doc[-1] == 258 else doc + [258])
    builder.finalize(str(tmp_path / "m.idx"))
    meta = import_megatron([tmp_path / "m"], byte_file, tmp_path / "out")
    assert docs_of(tmp_path / "out", "train") == expected
    assert meta["splits"]["train"]["num_documents"] == 12 and meta["splits"]["val"]["num_tokens"] == 0


def test_bin_size_mismatch_names_file(arrow_ds, byte_file, tmp_path):
    export_megatron(arrow_ds, tmp_path / "mg", "val")
    with open(tmp_path / "mg.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match=r"mg\.bin.*bytes"):
        read_index(tmp_path / "mg")
    p = cli("import-megatron", tmp_path / "mg", "--tokenizer", byte_file, "--out", tmp_path / "x")
    assert p.returncode != 0 and "mg.bin" in p.stderr and "Traceback" not in p.stderr


def test_token_id_outside_tokenizer_names_file(byte_file, tmp_path):
    from data_tools.megatron import IndexWriter

    w = IndexWriter(tmp_path / "big", np.uint16)
    w.add_document(np.array([1, 2, 258]))
    w.add_document(np.array([3, 300, 258]))  # 300 >= byte tokenizer's 259
    w.close()
    p = cli("import-megatron", tmp_path / "big", "--tokenizer", byte_file, "--out", tmp_path / "x")
    assert p.returncode != 0 and "big.bin" in p.stderr and "300" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x" / "metadata.json").exists()
