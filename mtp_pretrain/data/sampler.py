"""The deterministic global sample sequence of a mixture, and its small resumable state.

The stream is one global sequence of samples g = 0, 1, 2, ... that does not depend on the number of
ranks:
  * the source of sample g is a pure function of (seed, g): a counter-based hash mapped onto the
    cumulative mixture weights;
  * the k-th sample drawn from source s is window perm(seed, s, e)[k mod n_s] where e = k // n_s is
    that source's epoch and perm a permutation of its n_s windows reshuffled every epoch.
So the whole sequence is fixed by (seed, weights, datasets); the state needed to continue it is the
global cursor plus, per source, how many windows it has handed out (which fixes its epoch and
position). From a cursor c, rank r of W takes samples c+r, c+r+W, c+r+2W, ...; a step consumes the
block [c, c + B*W) on all ranks together, so the state after a step is the same on every rank and a
resume on any number of ranks continues the same sequence without repeat or gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each element (the SplitMix64 finaliser)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK64


def mixture_choice(seed: int, indices: np.ndarray, cum_weights: np.ndarray) -> np.ndarray:
    """Source index of each global sample index: a function of (seed, index) only."""
    with np.errstate(over="ignore"):
        keyed = indices.astype(np.uint64) ^ _splitmix64(np.array([seed], dtype=np.uint64))
    u = (_splitmix64(keyed) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform in [0, 1)
    return np.searchsorted(cum_weights, u, side="right")


@dataclass
class SamplerState:
    """Everything needed to continue the global sequence: JSON-friendly and a few numbers long."""

    seed: int
    cursor: int = 0  # next global sample index
    consumed: list[int] = field(default_factory=list)  # per source: windows handed out so far (all epochs)


class GlobalSampler:
    """Turns the global sample sequence into (source, window) pairs, one step at a time."""

    def __init__(self, weights: list[float], num_windows: list[int], state: SamplerState):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be non-negative with a positive sum, got {weights}")
        self.cum_weights = np.cumsum(w / w.sum())
        self.cum_weights[-1] = 1.0  # guard against rounding: every u < 1 finds a source
        self.num_windows = list(num_windows)
        self.state = state
        if not state.consumed:
            state.consumed = [0] * len(num_windows)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 2 * len(self.num_windows):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.state.seed, source, epoch])
            self._perm_cache[key] = rng.permutation(self.num_windows[source])
        return self._perm_cache[key]

    def next_block(self, size: int, single_epoch: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """Assign the next `size` global samples and advance the state.

        Returns (source, window) arrays for samples cursor .. cursor+size-1, or None (state
        unchanged) when `single_epoch` and some source would start its second epoch.
        """
        st = self.state
        indices = np.arange(st.cursor, st.cursor + size, dtype=np.uint64)
        sources = mixture_choice(st.seed, indices, self.cum_weights)
        windows = np.empty(size, dtype=np.int64)
        new_consumed = list(st.consumed)
        for s in np.unique(sources):
            rows = np.flatnonzero(sources == s)
            k = st.consumed[s] + np.arange(len(rows))  # this source's draw numbers, in global order
            epochs, positions = np.divmod(k, self.num_windows[s])
            if single_epoch and epochs[-1] > 0:
                return None
            for e in np.unique(epochs):
                sel = epochs == e
                windows[rows[sel]] = self._permutation(int(s), int(e))[positions[sel]]
            new_consumed[s] = int(k[-1]) + 1
        st.cursor += size
        st.consumed = new_consumed
        return sources, windows
