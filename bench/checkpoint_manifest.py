"""What the checkpoint manifest (per-file size + crc32) and its verification cost.

    .venv/bin/python -m bench.checkpoint_manifest [--dim 512] [--n-layers 8] [--repeats 3] [--dir /dev/shm]

Saves a model + AdamW state (one process, the trainer's CheckpointManager) --repeats times each
way, alternating the two ways within each round:

* ``recorded`` (what the trainer does): the manifest's sizes and crc32s are kept as DCP writes
  the files; ``manifest_s`` is what remains after the write (gathering them, checking the sizes);
* ``read_back`` (the save as it was before): the same save with a writer that records nothing,
  so that every file is read back for its crc32 -- the path a file not seen while writing takes.

The crc32 the ``recorded`` way computes inside the write is timed on its own too (``crc_s``: the
checkpoint's bytes, already in memory): the manifest now costs ``crc_s + manifest_s``, before
``read_back_manifest_s``. Each save's CPU time (``process_time``: this process, every thread) is
reported beside its wall time: on a shared machine the wall-clock saves swing by seconds.

``--dir``: where the checkpoints go (default: a temp dir on the local disk); ``/dev/shm`` (tmpfs:
no disk, fsync a no-op) leaves the CPU work alone, steadier on a shared machine.

Then times resuming (``CheckpointManager.load``) with ``checkpoint.verify=size`` and
``checkpoint.verify=checksum``, alternating the two so that machine load hits both alike. The
checkpoint goes to a temp dir on the local disk, just written, so the read-back is mostly from
the page cache (as it is in training, where the manifest is computed right after the save).
Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zlib
from pathlib import Path

from bench.common import print_result
import torch
from torch.distributed.checkpoint import FileSystemWriter

from mtp_pretrain import checkpoint
from mtp_pretrain.checkpoint import CheckpointManager
from mtp_pretrain.model import ModelConfig, MTPTransformer
from mtp_pretrain.parallel.base import ModelState, OptimState
from mtp_pretrain.parallel.setup import DistEnv


class RecordsNothing(checkpoint.DigestingWriter):
    """DCP's plain writer: no file is seen while writing, so the save reads every one back."""

    def __init__(self, path):
        FileSystemWriter.__init__(self, path)

    def digests(self, root):
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="parent of the temp dir the checkpoints go to")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=8, n_future=4, vocab_size=32000)
    model = MTPTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():  # populate AdamW's moments, as a trained model's checkpoint has them
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = {"model": ModelState(model), "optim": OptimState(model, optimizer)}
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    train_state = {"step": 0, "tokens_seen": 0, "scheduler": {}, "data": {}}

    real_writer = checkpoint.DigestingWriter
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ways = ("recorded", "read_back")
        managers = {way: CheckpointManager(Path(tmp) / way, keep=2, env=env, log=lambda msg: None) for way in ways}
        save_s: dict[str, list[float]] = {way: [] for way in ways}
        save_cpu_s: dict[str, list[float]] = {way: [] for way in ways}
        manifest_s: dict[str, list[float]] = {way: [] for way in ways}
        for step in range(1, args.repeats + 1):
            for way in ways if step % 2 else ways[::-1]:
                checkpoint.DigestingWriter = RecordsNothing if way == "read_back" else real_writer
                t0, cpu0 = time.perf_counter(), time.process_time()
                managers[way].save(step, state, train_state)
                save_s[way].append(time.perf_counter() - t0)
                save_cpu_s[way].append(time.process_time() - cpu0)
                manifest_s[way].append(managers[way].last_manifest_s)
            checkpoint.DigestingWriter = real_writer
            print(f"save {step}/{args.repeats}: " + ", ".join(
                f"{way} {save_s[way][-1]:.2f}s, CPU {save_cpu_s[way][-1]:.2f}s (manifest {manifest_s[way][-1]:.2f}s)"
                for way in ways), flush=True)
        ckpt = managers["recorded"]
        path = ckpt.root / f"step-{args.repeats:08d}"
        size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        crc_s = []
        for _ in range(args.repeats):
            crc_s.append(0.0)
            for f in sorted(f for f in path.rglob("*") if f.is_file()):
                data = f.read_bytes()
                t0 = time.perf_counter()
                zlib.crc32(data)
                crc_s[-1] += time.perf_counter() - t0
        load_s: dict[str, list[float]] = {"size": [], "checksum": []}
        for i in range(args.repeats):
            for verify in ("size", "checksum") if i % 2 == 0 else ("checksum", "size"):
                t0 = time.perf_counter()
                ckpt.load(path, state, verify=verify, model_config=cfg)
                load_s[verify].append(time.perf_counter() - t0)
            print(f"load {i + 1}/{args.repeats}: verify=size {load_s['size'][-1]:.2f}s, "
                  f"verify=checksum {load_s['checksum'][-1]:.2f}s", flush=True)

    med = statistics.median
    result = {
        "bench": "checkpoint_manifest", "dir": args.dir or tempfile.gettempdir(), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "checkpoint_mb": round(size_mb, 1),
        "save_s": round(med(save_s["recorded"]), 3), "manifest_s": round(med(manifest_s["recorded"]), 3),
        "manifest_share_of_save": round(med(manifest_s["recorded"]) / med(save_s["recorded"]), 3),
        "crc_s": round(med(crc_s), 3), "save_cpu_s": round(med(save_cpu_s["recorded"]), 3),
        "read_back_save_s": round(med(save_s["read_back"]), 3),
        "read_back_save_cpu_s": round(med(save_cpu_s["read_back"]), 3),
        "read_back_manifest_s": round(med(manifest_s["read_back"]), 3),
        "read_back_manifest_share_of_save": round(med(manifest_s["read_back"]) / med(save_s["read_back"]), 3),
        "save_s_recorded_over_read_back": round(med(save_s["recorded"]) / med(save_s["read_back"]), 3),
        "save_cpu_s_recorded_over_read_back": round(med(save_cpu_s["recorded"]) / med(save_cpu_s["read_back"]), 3),
        "load_verify_size_s": round(med(load_s["size"]), 3),
        "load_verify_checksum_s": round(med(load_s["checksum"]), 3),
        "checksum_share_of_load": round(1 - med(load_s["size"]) / med(load_s["checksum"]), 3),
    }
    print_result(result)


if __name__ == "__main__":
    main()
