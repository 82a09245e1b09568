"""One rank of the data pipeline across nodes: reads its share of one epoch of the train split
and records what it read.

usage (one process per rank, under srun):  python tests/multinode/read_epoch.py OUT_DIR MICRO_BATCH SOURCE...

Rank and world size come from the trainer's own reading of the srun environment
(mtp_pretrain.parallel.setup.launcher_ranks).
Each rank writes OUT_DIR/rank-<r>.json: its host, its SLURM node id, and the SHA-1 of every
window (row) it was given, in order. The test compares the union with a one-process read.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

from mtp_pretrain.data.stream import ArrowTokenStream, DataSource
from mtp_pretrain.parallel.setup import launcher_ranks


def main() -> int:
    out, micro, paths = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    rank, world, _ = launcher_ranks()
    stream = ArrowTokenStream([DataSource(path=p, weight=1.0) for p in paths], window=36,
                              micro_batch_size=micro, rank=rank, world_size=world, seed=7,
                              prefetch=0, infinite=False)
    rows = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for batch in stream for row in batch]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": world, "host": socket.gethostname(),
        "node_id": int(os.environ["SLURM_NODEID"]), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
