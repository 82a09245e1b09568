"""ArrowTokenStream: rank sharding, mixture ratio, epochs, and exact resume (also across world sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mtp_pretrain.data import ArrowTokenStream, DataSource
from mtp_pretrain.data.dataset import TokenWindows
from mtp_pretrain.data.synthetic import write_random_dataset

WINDOW = 17
B = 2
NUM_WINDOWS = 56  # divisible by B*W for W in 1, 2, 4, and 56 - 5 steps of W=2 divisible by B*3


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One dataset of exactly 56 train windows (plus a tail that must never be used)."""
    path = tmp_path_factory.mktemp("single") / "ds"
    write_random_dataset(path, {"train": NUM_WINDOWS * WINDOW + 5, "val": 10 * WINDOW}, shard_tokens=200, doc_len=40, seed=1)
    return path


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> tuple[Path, Path]:
    """Two datasets told apart by their ids: "low" uses [0, 128), "high" [128, 256)."""
    root = tmp_path_factory.mktemp("mix")
    write_random_dataset(root / "low", {"train": 3000 * WINDOW, "val": WINDOW}, low=0, high=128, seed=2)
    write_random_dataset(root / "high", {"train": 2000 * WINDOW, "val": WINDOW}, low=128, high=256, seed=3)
    return root / "low", root / "high"


def all_windows(path: Path) -> set[bytes]:
    ds = TokenWindows(path, "train", WINDOW)
    out = np.empty(WINDOW, dtype=np.int64)
    seen = set()
    for i in range(ds.num_windows):
        ds.read(i, out)
        seen.add(out.tobytes())
    assert len(seen) == ds.num_windows == NUM_WINDOWS
    return seen


def rows(batches) -> list[bytes]:
    return [row.numpy().tobytes() for b in batches for row in b]


def make(path, rank=0, world_size=1, infinite=False, prefetch=0, seed=7, **kw) -> ArrowTokenStream:
    return ArrowTokenStream([DataSource(str(path))], window=WINDOW, micro_batch_size=B, rank=rank,
                            world_size=world_size, seed=seed, prefetch=prefetch, infinite=infinite, **kw)


def test_batch_shape_and_metadata(single):
    stream = make(single)
    batch = next(iter(stream))
    assert batch.dtype == torch.int64 and batch.shape == (B, WINDOW)
    assert (stream.vocab_size, stream.eos_id, stream.pad_id) == (259, 258, 256)
    assert len(stream.tokenizer_hash) == 16
    json.dumps(stream.state_dict())  # JSON-serialisable


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_disjoint_and_cover_the_epoch(single, world_size):
    per_rank = [rows(make(single, r, world_size, prefetch=2)) for r in range(world_size)]
    assert len({len(r) for r in per_rank}) == 1  # ranks step together
    seen = [x for r in per_rank for x in r]
    assert len(seen) == len(set(seen)) == NUM_WINDOWS  # disjoint, nothing twice
    assert set(seen) == all_windows(single)  # union is the whole epoch


def test_ranks_in_separate_processes(single, tmp_path):
    """Two real processes, each opening and memory-mapping the shards itself."""
    script = textwrap.dedent(f"""
        import json, sys
        from mtp_pretrain.data import ArrowTokenStream, DataSource
        rank = int(sys.argv[1])
        s = ArrowTokenStream([DataSource({str(single)!r})], window={WINDOW}, micro_batch_size={B},
                             rank=rank, world_size=2, seed=7, prefetch=2, infinite=False)
        rows = [row.tolist() for b in s for row in b]
        json.dump(rows, open(sys.argv[2], "w"))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path / f"r{r}.json")]) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    per_rank = [[np.array(x, dtype=np.int64).tobytes() for x in json.loads((tmp_path / f"r{r}.json").read_text())] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == all_windows(single)
    assert len(per_rank[0]) == len(per_rank[1]) == NUM_WINDOWS // 2


def test_mixture_ratio_within_two_percent(mixture):
    low, high = mixture
    stream = ArrowTokenStream([DataSource(str(low), 0.7), DataSource(str(high), 0.3)], window=WINDOW,
                              micro_batch_size=100, seed=11, prefetch=2)
    it = iter(stream)
    batches = [next(it) for _ in range(100)]  # 10k sequences; 3000 / 2000 windows, so both wrap epochs
    is_low = torch.cat([(b < 128).all(dim=1) for b in batches])
    is_high = torch.cat([(b >= 128).all(dim=1) for b in batches])
    assert bool((is_low ^ is_high).all())  # every window comes whole from one source
    assert abs(is_low.float().mean().item() - 0.7) < 0.02
    consumed = [s["consumed"] for s in stream.state_dict()["sources"]]
    assert sum(consumed) == 10_000 == stream.state_dict()["cursor"]


def test_mixture_is_deterministic_and_seeded(mixture):
    low, high = mixture

    def first(seed):
        s = ArrowTokenStream([DataSource(str(low), 0.5), DataSource(str(high), 0.5)], window=WINDOW, micro_batch_size=8, seed=seed, prefetch=0)
        it = iter(s)
        return torch.cat([next(it) for _ in range(5)])

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def test_epochs_reshuffle_and_each_covers_everything(single):
    stream = make(single, infinite=True)
    it = iter(stream)
    steps_per_epoch = NUM_WINDOWS // B
    epoch0 = rows(next(it) for _ in range(steps_per_epoch))
    epoch1 = rows(next(it) for _ in range(steps_per_epoch))
    assert set(epoch0) == set(epoch1) == all_windows(single)
    assert epoch0 != epoch1  # reshuffled with (seed, epoch)
    assert stream.state_dict()["sources"][0]["consumed"] == 2 * NUM_WINDOWS


def test_finite_stream_stops_after_one_epoch_and_replays(single):
    stream = make(single, infinite=False, prefetch=2)
    first_pass = rows(stream)
    assert len(first_pass) == NUM_WINDOWS and set(first_pass) == all_windows(single)
    assert stream.state_dict()["cursor"] == NUM_WINDOWS
    partial = rows(b for _, b in zip(range(3), stream))  # an evaluation capped at 3 batches
    assert partial == first_pass[: 3 * B]
    assert rows(stream) == first_pass  # every evaluation sees the same batches


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(single, prefetch):
    reference = make(single, infinite=True, prefetch=prefetch, seed=5)
    it = iter(reference)
    for _ in range(9):
        next(it)
    state = json.loads(json.dumps(reference.state_dict()))  # as a checkpoint would store it
    expected = [next(it) for _ in range(30)]  # runs into the second epoch (28 steps per epoch)

    resumed = make(single, infinite=True, prefetch=prefetch, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    got = [next(it2) for _ in range(30)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert resumed.state_dict() == reference.state_dict()


def test_close_stops_the_prefetch_thread(single):
    import threading

    def prefetchers():
        return [t for t in threading.enumerate() if t.name == "ArrowTokenStream-prefetch" and t.is_alive()]

    stream = make(single, infinite=True, prefetch=2)
    it = iter(stream)
    next(it)
    assert len(prefetchers()) == 1
    it2 = iter(stream)  # a new iterator replaces the old one and continues after the yielded batch
    assert stream.state_dict()["cursor"] == B and next(it2).shape == (B, WINDOW)
    assert len(prefetchers()) == 1
    stream.close()
    assert prefetchers() == []
    it3 = iter(stream)
    next(it3)
    del it, it2, it3  # an iterator that is dropped stops its thread too
    assert prefetchers() == []


def test_state_reflects_yielded_not_prefetched_batches(single):
    eager = make(single, infinite=True, prefetch=4)
    lazy = make(single, infinite=True, prefetch=0)
    ie, il = iter(eager), iter(lazy)
    for _ in range(3):
        assert torch.equal(next(ie), next(il))
    assert eager.state_dict() == lazy.state_dict()
    assert eager.state_dict()["cursor"] == 3 * B


@pytest.mark.parametrize("new_world_size", [3, 1])
def test_resume_on_another_world_size_neither_repeats_nor_loses(single, new_world_size):
    old = [make(single, r, 2, prefetch=2) for r in range(2)]
    iters = [iter(s) for s in old]
    seen = []
    for _ in range(5):  # 5 steps of 2 ranks x B: 20 of the 56 windows
        for it in iters:
            seen += rows([next(it)])
    states = [s.state_dict() for s in old]
    assert states[0] == states[1]  # identical on every rank

    for r in range(new_world_size):
        s = make(single, r, new_world_size, prefetch=2)
        s.load_state_dict(states[0])
        seen += rows(s)  # to the end of the epoch
    assert len(seen) == len(set(seen)) == NUM_WINDOWS
    assert set(seen) == all_windows(single)


def test_val_split_is_separate(single):
    val = ArrowTokenStream([DataSource(str(single))], window=WINDOW, micro_batch_size=1, split="val", infinite=False, prefetch=0)
    assert len(rows(val)) == 10
    assert not set(rows(val)) & all_windows(single)


def test_memory_mapped_not_loaded(single):
    """The shard arrays are zero-copy views of Arrow buffers backed by memory maps (bench checks RSS)."""
    ds = TokenWindows(single, "train", WINDOW)
    assert len(ds._chunks) == 5  # one per shard of 200 tokens
    assert all(not chunk.flags.owndata and not chunk.flags.writeable for chunk in ds._chunks)
