"""Counting communicated bytes (and the time spent in the calls) of ``torch.distributed``
collectives, by wrapping them for the duration of a ``with CommCounter():`` block.

What is counted is the size of each call's *input* buffer on this rank -- for a reduce-scatter
the full unsharded gradient, for an all-gather the local shard, for an all-reduce the tensor.
FSDP2 and the DDP strategy call these functions through ``torch.distributed``, so they are
seen; DTensor's functional collectives (TP) and DeepSpeed's comm layer are not (DeepSpeed has
its own ``comms_logger``).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist

WRAPPED = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce_scatter_single",
           "all_gather_single", "broadcast", "reduce_scatter", "all_gather", "all_to_all_single")
# (output, input, ...) signatures: the input is the second argument
_SECOND = ("reduce_scatter_tensor", "all_gather_into_tensor", "reduce_scatter_single", "all_gather_single",
           "all_to_all_single", "reduce_scatter", "all_gather")


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CommCounter:
    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self._saved = {}

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            # input buffer: reduce_scatter_tensor(output, input), all_gather_into_tensor(output, input)
            if name in _SECOND:
                buf = args[1] if len(args) > 1 else next(
                    (kwargs[k] for k in ("input", "input_tensor", "input_list", "tensor") if k in kwargs), None)
            else:
                buf = args[0] if args else kwargs.get("tensor")
            self.bytes[name] += _nbytes(buf)
            self.calls[name] += 1
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if out is not None and hasattr(out, "wait") and not kwargs.get("async_op", False):
                out.wait()
            self.seconds[name] += time.perf_counter() - t0
            return out

        return wrapped

    def __enter__(self):
        for name in WRAPPED:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls),
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}
