"""The ``mtp-plan`` tables of docs/scaling.md: predicted per-rank memory of one FSDP training step
for the 1b, 7b and 70b shapes on 8, 64 and 512 GPUs of 80 GB, n = 1 and 4, head-sequential vs
naive loss, with and without activation checkpointing. Predictions, not measurements.

    .venv/bin/python bench/plan_tables.py                       # everything (tens of minutes on 2 cores)
    .venv/bin/python bench/plan_tables.py --models 1b --worlds 8

Each row is one fake step (``mtp_pretrain.plan.plan_step``) of
``model=<m> parallel=fsdp data.seq_len=4096 train.micro_batch_size=1`` with the row's
``model.n_future``, ``loss.impl`` and ``parallel.activation_checkpointing``. For n = 1 the two
losses are the same computation (one head), so only head-sequential is run. Markdown goes to
stdout row by row; the last line is one JSON object with every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mtp_pretrain.config import compose_job_config
from mtp_pretrain.plan import CATEGORIES, FRAGMENTATION, GPU_TYPES, RESERVED_GIB, GiB, plan_step

BASE = ["parallel=fsdp", "data.seq_len=4096", "train.micro_batch_size=1"]


def rows_for(n: int) -> list[tuple[str, str]]:
    impls = ["head_sequential"] if n == 1 else ["head_sequential", "naive"]
    return [(impl, ac) for ac in ("none", "full") for impl in impls]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="1b,7b,70b")
    ap.add_argument("--worlds", default="8,64,512")
    ap.add_argument("--n", default="1,4")
    ap.add_argument("--device", default="h100-80gb", choices=sorted(GPU_TYPES))
    args = ap.parse_args(argv)
    memory_gib = GPU_TYPES[args.device].memory_gib
    out = []
    print(f"mtp-plan predictions, {' '.join(BASE)}, {args.device} ({memory_gib:.1f} GiB); fits = peak x "
          f"{1 + FRAGMENTATION:.2f} + {RESERVED_GIB} GiB <= device memory", flush=True)
    for model in args.models.split(","):
        print(f"\n### {model}\n\n| GPUs | n | loss | AC | peak GiB | params | grads | optim | activ | logits "
              f"| mask bias | fits | set-up peak today |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|",
              flush=True)
        for world in map(int, args.worlds.split(",")):
            for n in map(int, args.n.split(",")):
                for impl, ac in rows_for(n):
                    cfg = compose_job_config([f"model={model}", *BASE, f"model.n_future={n}", f"loss.impl={impl}",
                                              f"parallel.activation_checkpointing={ac}"])
                    t0 = time.perf_counter()
                    mem = plan_step(cfg, world, args.device)
                    need = mem.predicted * (1 + FRAGMENTATION) + RESERVED_GIB * GiB
                    row = {"model": model, "gpus": world, "n": n, "loss": impl, "ac": ac,
                           "peak_gib": round(mem.predicted / GiB, 2),
                           **{c: round(mem.breakdown.get(c, 0) / GiB, 2) for c in CATEGORIES},
                           "mask_bias_gib": round(mem.mask_bias_bytes / GiB, 2), "fits": need <= memory_gib * GiB,
                           "set_up_peak_gib": round(mem.set_up_peak / GiB, 1),
                           "plan_s": round(time.perf_counter() - t0, 1)}
                    out.append(row)
                    loss = "head-seq" if impl == "head_sequential" else "naive"
                    print(f"| {world} | {n} | {loss} | {ac} | {row['peak_gib']} | "
                          + " | ".join(str(row[c]) for c in CATEGORIES)
                          + f" | {row['mask_bias_gib']} | {'yes' if row['fits'] else 'no'} | "
                            f"{row['set_up_peak_gib']} |", flush=True)
    print(json.dumps({"bench": "plan_tables", "device": args.device, "rows": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
