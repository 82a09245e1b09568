"""What the checkpoint manifest (per-file size + crc32) and its verification cost.

    .venv/bin/python -m bench.checkpoint_manifest [--dim 512] [--n-layers 8] [--repeats 3]

Saves a model + AdamW state (one process, the trainer's CheckpointManager) --repeats times and
reports the save time and the part of it spent reading the files back for the manifest; then
times resuming (``CheckpointManager.load``) with ``checkpoint.verify=size`` and
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
from pathlib import Path

from bench.common import print_result
import torch

from mtp_pretrain.checkpoint import CheckpointManager
from mtp_pretrain.model import ModelConfig, MTPTransformer
from mtp_pretrain.parallel.base import ModelState, OptimState
from mtp_pretrain.parallel.setup import DistEnv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
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

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = CheckpointManager(Path(tmp), keep=2, env=env, log=lambda msg: print(msg, flush=True))
        save_s, manifest_s = [], []
        for step in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            path = ckpt.save(step, state, train_state)
            save_s.append(time.perf_counter() - t0)
            manifest_s.append(ckpt.last_manifest_s)
            print(f"save {step}/{args.repeats}: {save_s[-1]:.2f}s, manifest {manifest_s[-1]:.2f}s", flush=True)
        size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
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
        "bench": "checkpoint_manifest", "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "checkpoint_mb": round(size_mb, 1), "save_s": round(med(save_s), 3), "manifest_s": round(med(manifest_s), 3),
        "manifest_share_of_save": round(med(manifest_s) / med(save_s), 3),
        "manifest_mb_per_s": round(size_mb / med(manifest_s), 1),
        "load_verify_size_s": round(med(load_s["size"]), 3),
        "load_verify_checksum_s": round(med(load_s["checksum"]), 3),
        "checksum_share_of_load": round(1 - med(load_s["size"]) / med(load_s["checksum"]), 3),
    }
    print_result(result)


if __name__ == "__main__":
    main()
