"""``parallel.compile=true`` (inductor on CPU, each trunk block compiled) under fsdp and tp against
one eager process accumulating the same global batch: per-step losses, per-step gradient norms and
final parameters (tests/test_parallel.assert_matches). Slow: inductor compiles every rank's blocks."""

from __future__ import annotations

import pytest
from conftest import launch_worker
from test_parallel import assert_matches, base_overrides, data, final_params  # noqa: F401 - data: fixture

COMPILED = ["parallel.compile=true"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp", "tp"])
def test_compiled_strategy_matches_eager_one_process(strategy, data, tmp_path):
    ref = launch_worker(tmp_path / "eager", 1, [{"name": "eager", "overrides": base_overrides(data)}])["eager"]
    res = launch_worker(tmp_path / strategy, 2, [{"name": "compiled", "overrides": base_overrides(data) + COMPILED
                                                 + [f"parallel={strategy}"]}])["compiled"]
    assert res["world_size"] == 2
    assert_matches(res, ref, final_params(ref["dir"]), f"{strategy} x2 compiled vs one eager process")
