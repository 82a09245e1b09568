"""ArrowTokenStream: the training/validation batch stream over a mixture of tokenized datasets."""

from __future__ import annotations

import queue
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .dataset import TokenWindows
from .errors import DataError
from .sampler import GlobalSampler, SamplerState

if TYPE_CHECKING:
    import torch

STATE_VERSION = 1


@dataclass
class DataSource:
    path: str
    weight: float = 1.0


class ArrowTokenStream:
    """Batches [micro_batch_size, window] of token ids from a weighted mixture of datasets.

    Rank `rank` of `world_size` yields only its share of one deterministic global sample sequence
    (see sampler.py): every rank reads only its own windows, no two ranks see the same sample, and
    state_dict() — identical on all ranks — resumes the sequence exactly, on any world size.

    prefetch > 0 builds that many batches ahead in a background thread; state_dict() still
    describes the batches *yielded*, never those merely prefetched. One live iterator at a time.
    An infinite stream's new iter() continues after the last yielded batch; a finite one
    (infinite=False, for validation) replays its epoch from its start state (the beginning, or the
    state given to load_state_dict), so that every evaluation sees the same batches.
    """

    def __init__(
        self,
        sources: list[DataSource],
        window: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: str = "train",
        prefetch: int = 2,
        infinite: bool = True,
        verify: str = "size",
    ):
        if not sources:
            raise ValueError("at least one DataSource is required")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.sources = list(sources)
        self.window, self.micro_batch_size = window, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.split, self.prefetch, self.infinite = split, prefetch, infinite
        self.datasets = [TokenWindows(s.path, split, window, verify) for s in self.sources]

        if not infinite and sum(ds.num_windows for ds in self.datasets) < micro_batch_size * world_size:
            raise DataError(
                f"{', '.join(str(ds.path) for ds in self.datasets)}: split '{split}' has "
                f"{sum(ds.num_windows for ds in self.datasets)} windows of {window} tokens, fewer than one step "
                f"of {micro_batch_size} x {world_size} ranks; a finite stream would yield nothing"
            )
        first = self.datasets[0]
        for ds in self.datasets[1:]:
            if ds.tokenizer_hash != first.tokenizer_hash:
                raise DataError(
                    f"{ds.path}: tokenizer {ds.tokenizer_hash} differs from {first.path}'s "
                    f"{first.tokenizer_hash}; all sources of a mixture must share one tokenizer"
                )
            if ds.eos_id != first.eos_id:
                raise DataError(f"{ds.path}: EOS id {ds.eos_id} differs from {first.path}'s {first.eos_id}; "
                                "all sources of a mixture must map the special-token roles alike")
        self.vocab_size, self.eos_id, self.pad_id = first.vocab_size, first.eos_id, first.pad_id
        self.tokenizer_hash = first.tokenizer_hash
        self._state = SamplerState(seed=seed, consumed=[0] * len(self.sources))
        self._start_state = self._copy(self._state)
        self._active: weakref.ref | None = None

    @staticmethod
    def _copy(state: SamplerState) -> SamplerState:
        return SamplerState(state.seed, state.cursor, list(state.consumed))

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self._state.seed,
            "cursor": self._state.cursor,
            "window": self.window,
            "split": self.split,
            "sources": [
                {"path": str(s.path), "num_windows": ds.num_windows, "consumed": c}
                for s, ds, c in zip(self.sources, self.datasets, self._state.consumed)
            ],
        }

    @staticmethod
    def _source_key(path: str, all_paths: list[str]) -> str:
        """Sources match across a resume by directory name (a dataset may move), or by full path
        where two sources share a name."""
        name = Path(path).name
        return name if [Path(p).name for p in all_paths].count(name) == 1 else str(path)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, saved on any world size. The saved seed wins over the constructor's.

        Sources are matched by name: one added since the state was saved starts at zero (the
        global cursor continues, so the mixture changes from here on); one removed is dropped with
        a warning."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["window"] != self.window:
            raise DataError(f"data state was saved with window {state['window']}, this stream has {self.window}")
        saved = {self._source_key(s["path"], [x["path"] for x in state["sources"]]): s for s in state["sources"]}
        consumed = []
        for source, ds in zip(self.sources, self.datasets):
            entry = saved.pop(self._source_key(source.path, [s.path for s in self.sources]), None)
            if entry is None:  # a source added on resume (an annealing mixture) starts at its beginning
                consumed.append(0)
                continue
            if entry["num_windows"] != ds.num_windows:
                raise DataError(f"{ds.path}: {ds.num_windows} windows, the data state was saved with "
                                f"{entry['num_windows']} (dataset changed)")
            consumed.append(entry["consumed"])
        for entry in saved.values():
            warnings.warn(f"data source {entry['path']} is in the resumed data state but no longer in the mixture; "
                          f"dropped after {entry['consumed']} of its windows", stacklevel=2)
        self._state = SamplerState(seed=state["seed"], cursor=state["cursor"], consumed=consumed)
        self._start_state = self._copy(self._state)

    # -- iteration ----------------------------------------------------------------------------

    def _batches(self, state: SamplerState) -> Iterator[tuple[torch.Tensor, SamplerState]]:
        """Batches of this rank from `state` on, each with the state after it (private copy)."""
        # torch is imported here, not at module level, so that the data tools' tokenizer worker
        # processes (which import this package) start without paying for it.
        import torch

        sampler = GlobalSampler(
            [s.weight for s in self.sources], [ds.num_windows for ds in self.datasets], state
        )
        block = self.micro_batch_size * self.world_size
        while True:
            assigned = sampler.next_block(block, single_epoch=not self.infinite)
            if assigned is None:
                return
            sources, windows = assigned
            out = np.empty((self.micro_batch_size, self.window), dtype=np.int64)
            # Row i of this rank is global sample cursor + rank + i * world_size.
            for i, (s, w) in enumerate(zip(sources[self.rank :: self.world_size], windows[self.rank :: self.world_size])):
                self.datasets[s].read(int(w), out[i])
            yield torch.from_numpy(out), self._copy(state)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.close()  # one live iterator: stop the previous one's prefetch thread
        iterator = self._iterate()
        # A weak reference: an iterator the caller drops is closed (its thread stopped) at once.
        self._active = weakref.ref(iterator)
        return iterator

    def _iterate(self) -> Iterator[torch.Tensor]:
        start = self._copy(self._state if self.infinite else self._start_state)
        source = self._batches(start) if self.prefetch <= 0 else _prefetched(self._batches(start), self.prefetch)
        try:
            for batch, state_after in source:
                self._state = state_after
                yield batch
        finally:
            source.close()

    def close(self) -> None:
        """Stop the live iterator and its prefetch thread (also done by the next iter())."""
        active = self._active() if self._active is not None else None
        self._active = None
        if active is not None:
            active.close()


_END = object()


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Run `items` in a background thread, `depth` items ahead; re-raise its errors here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    thread = threading.Thread(target=produce, name="ArrowTokenStream-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
