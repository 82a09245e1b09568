"""Changing the mixture on resume: a source added starts at zero, a source dropped warns; the
sources kept continue exactly where they were."""

from __future__ import annotations

import numpy as np
import pytest

from mtp_pretrain.data import ArrowTokenStream, DataSource
from mtp_pretrain.data.synthetic import write_random_dataset

WINDOW, B = 16, 4


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("mix")
    write_random_dataset(root / "low", {"train": 400 * WINDOW, "val": WINDOW}, low=0, high=128, seed=2)
    write_random_dataset(root / "high", {"train": 300 * WINDOW, "val": WINDOW}, low=128, high=256, seed=3)
    return str(root / "low"), str(root / "high")


def stream(paths: list[str]) -> ArrowTokenStream:
    return ArrowTokenStream([DataSource(p) for p in paths], window=WINDOW, micro_batch_size=B, seed=5, prefetch=0)


def rows(s: ArrowTokenStream, n_batches: int) -> list[np.ndarray]:
    it = iter(s)
    return [row.numpy() for _ in range(n_batches) for row in next(it)]


def is_low(row: np.ndarray) -> bool:
    return bool(row.max() < 128)


def test_added_source_starts_at_zero_and_kept_one_continues(sources):
    low, high = sources
    original = stream([low])
    rows(original, 10)
    state = original.state_dict()
    continued_low = rows(original, 10)  # what low alone would have handed out next

    annealed = stream([low, high])
    annealed.load_state_dict(state)
    after = rows(annealed, 10)
    low_rows = [r for r in after if is_low(r)]
    high_rows = [r for r in after if not is_low(r)]
    assert len(low_rows) >= 5 and len(high_rows) >= 5
    assert all(np.array_equal(a, b) for a, b in zip(low_rows, continued_low))
    assert annealed.state_dict()["sources"][1]["consumed"] == len(high_rows)  # from zero
    assert annealed.state_dict()["sources"][0]["consumed"] == 10 * B + len(low_rows)


def test_dropped_source_warns_and_the_rest_continue(sources):
    low, high = sources
    mixed = stream([low, high])
    rows(mixed, 10)
    state = mixed.state_dict()
    next_low = [r for r in rows(mixed, 20) if is_low(r)]

    only_low = stream([low])
    with pytest.warns(UserWarning, match=r"high is in the resumed data state but no longer in the mixture"):
        only_low.load_state_dict(state)
    after = rows(only_low, 5)
    assert len(next_low) >= len(after) == 5 * B
    assert all(is_low(r) for r in after)
    assert all(np.array_equal(a, b) for a, b in zip(after, next_low))
