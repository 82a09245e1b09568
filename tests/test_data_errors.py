"""Bad input fails at start-up (or at the first bad read) with a DataError naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mtp_pretrain.data import ArrowTokenStream, BPETokenizer, ByteTokenizer, DataError, DataSource, load_tokenizer
from mtp_pretrain.data.synthetic import write_random_dataset

WINDOW = 9


@pytest.fixture
def ds(tmp_path) -> Path:
    path = tmp_path / "ds"
    write_random_dataset(path, {"train": 40 * WINDOW, "val": 4 * WINDOW}, shard_tokens=100, seed=0)
    return path


def open_stream(*paths, verify="size", **kw) -> ArrowTokenStream:
    return ArrowTokenStream([DataSource(str(p)) for p in paths], window=WINDOW, micro_batch_size=2, prefetch=0, verify=verify, **kw)


def edit_metadata(path: Path, fn) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    fn(meta)
    (path / "metadata.json").write_text(json.dumps(meta))


def test_sound_dataset_opens(ds):
    assert next(iter(open_stream(ds, verify="checksum"))).shape == (2, WINDOW)


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match=r"metadata\.json.*missing"):
        open_stream(tmp_path)


def test_missing_shard(ds):
    (ds / "train-00002.arrow").unlink()
    with pytest.raises(DataError, match=r"train-00002\.arrow.*missing"):
        open_stream(ds)


def test_truncated_shard(ds):
    shard = ds / "train-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(DataError, match=r"train-00001\.arrow.*truncated"):
        open_stream(ds)


def test_corrupt_arrow_file(ds):
    """Not an Arrow file at all, though its size matches the metadata."""
    shard = ds / "train-00000.arrow"
    shard.write_bytes(b"x" * shard.stat().st_size)
    with pytest.raises(DataError, match=r"train-00000\.arrow.*not a readable Arrow IPC file"):
        open_stream(ds)


def _overwrite_tokens(shard: Path, value: int) -> None:
    """Overwrite the first token ids in place (size unchanged), as bit rot would."""
    raw = bytearray(shard.read_bytes())
    tokens = pa.ipc.open_file(pa.BufferReader(bytes(raw))).get_batch(0).column(0).to_numpy()
    at = raw.find(tokens[:8].tobytes())  # where the token buffer starts in the file
    raw[at : at + 2] = np.uint16(value).tobytes()
    shard.write_bytes(bytes(raw))


def test_checksum_mismatch(ds):
    shard = ds / "train-00003.arrow"
    _overwrite_tokens(shard, 7)
    open_stream(ds, verify="size")  # the fast path sees nothing wrong with a valid id
    with pytest.raises(DataError, match=r"train-00003\.arrow.*checksum mismatch"):
        open_stream(ds, verify="checksum")


def test_token_id_out_of_range_in_metadata(ds):
    edit_metadata(ds, lambda m: m["splits"]["train"]["shards"][1].update(max_token_id=300))
    with pytest.raises(DataError, match=r"train-00001\.arrow.*token id 300 >= vocab size 259"):
        open_stream(ds)


def test_token_id_out_of_range_in_data_is_never_yielded(ds):
    """Corrupt ids that the size check cannot see are caught when read, naming the shard."""
    _overwrite_tokens(ds / "train-00000.arrow", 60000)
    stream = ArrowTokenStream([DataSource(str(ds))], window=WINDOW, micro_batch_size=40, prefetch=2, infinite=False)
    with pytest.raises(DataError, match=r"train-00000\.arrow.*token id 60000 >= vocab size 259"):
        list(stream)


def test_tokenizer_does_not_match_metadata(ds):
    BPETokenizer.train(["some text for a tiny tokenizer"] * 10, vocab_size=300, show_progress=False).save(ds / "tokenizer.json")
    with pytest.raises(DataError, match=r"tokenizer\.json.*does not match the dataset metadata"):
        load_tokenizer(ds)
    with pytest.raises(DataError, match=r"tokenizer\.json.*does not match"):
        open_stream(ds)


def test_missing_tokenizer(ds):
    (ds / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.json.*no tokenizer"):
        open_stream(ds)


def test_mixture_of_different_tokenizers(ds, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ds, other)
    # Same shards, but a tokenizer file with different content (hence hash), recorded consistently.
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + "\n")
    edit_metadata(other, lambda m: m["tokenizer"].update(hash=load_tokenizer(other / "tokenizer.json").hash))
    open_stream(other)  # consistent on its own
    with pytest.raises(DataError, match=r"other.*all sources of a mixture must share one tokenizer"):
        open_stream(ds, other)


def test_state_from_another_dataset_is_refused(ds, tmp_path):
    """A checkpoint's data state does not silently apply to a dataset that was rebuilt differently."""
    rebuilt = tmp_path / "rebuilt" / "ds"
    write_random_dataset(rebuilt, {"train": 20 * WINDOW, "val": WINDOW}, seed=1)
    state = open_stream(ds).state_dict()
    with pytest.raises(DataError, match=r"rebuilt/ds: 20 windows, the data state was saved with 40"):
        open_stream(rebuilt).load_state_dict(state)


def test_byte_tokenizer_file_round_trip(tmp_path):
    ByteTokenizer().save(tmp_path / "t.json")
    tok = load_tokenizer(tmp_path / "t.json")
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok.encode("héllo")) == "héllo"


def test_finite_split_too_small_for_one_step(ds):
    with pytest.raises(DataError, match=r"split 'val' has 4 windows.*fewer than one step of 2 x 3 ranks"):
        open_stream(ds, split="val", infinite=False, world_size=3)
