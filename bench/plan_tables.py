"""The ``mtp-plan`` tables of docs/scaling.md: predicted per-rank memory of one FSDP training step
for the 1b, 7b and 70b shapes on 8, 64 and 512 GPUs of 80 GB, n = 1 and 4, head-sequential vs
naive loss, with and without activation checkpointing. Predictions, not measurements.

    .venv/bin/python -m bench.plan_tables                       # everything (tens of minutes on 2 cores)
    .venv/bin/python -m bench.plan_tables --models 1b --worlds 8

Each row is one fake step (``mtp_pretrain.plan.plan_step``) of
``model=<m> parallel=fsdp data.seq_len=4096 train.micro_batch_size=1`` with the row's
``model.n_future``, ``loss.impl`` and ``parallel.activation_checkpointing``. For n = 1 the two
losses are the same computation (one head), so only head-sequential is run. Each row is printed
as JSON when done (checkpointed variants first), then one markdown table per model; the last
line is one JSON object with every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.common import print_result
from mtp_pretrain.config import compose_job_config
from mtp_pretrain.plan import CATEGORIES, FRAGMENTATION, GPU_TYPES, RESERVED_GIB, GiB, plan_step

BASE = ["parallel=fsdp", "data.seq_len=4096", "train.micro_batch_size=1"]


# (n, loss, AC), in the order they are run: checkpointed rows first (the ones that fit at 4096 tokens).
VARIANTS = [(4, "head_sequential", "full"), (4, "naive", "full"), (1, "head_sequential", "full"),
            (4, "head_sequential", "none"), (4, "naive", "none"), (1, "head_sequential", "none")]


def table(rows: list[dict], model: str) -> str:
    """Markdown for one model, rows ordered by GPUs, n, AC, loss."""
    lines = [f"### {model}", "", "| GPUs | n | loss | AC | peak GiB | params | grads | optim | activ | logits "
             "| mask bias | fits | set-up peak today |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["gpus"], r["n"], r["ac"] != "none", r["loss"] != "head_sequential")  # noqa: E731
    for r in sorted((r for r in rows if r["model"] == model), key=key):
        loss = "head-seq" if r["loss"] == "head_sequential" else "naive"
        lines.append(f"| {r['gpus']} | {r['n']} | {loss} | {r['ac']} | {r['peak_gib']} | "
                     + " | ".join(str(r[c]) for c in CATEGORIES)
                     + f" | {r['mask_bias_gib']} | {'yes' if r['fits'] else 'no'} | {r['set_up_peak_gib']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="1b,7b,70b")
    ap.add_argument("--worlds", default="8,64,512")
    ap.add_argument("--n", default="1,4")
    ap.add_argument("--device", default="h100-80gb", choices=sorted(GPU_TYPES))
    args = ap.parse_args(argv)
    memory_gib = GPU_TYPES[args.device].memory_gib
    out = []
    models, worlds = args.models.split(","), [int(w) for w in args.worlds.split(",")]
    ns = {int(n) for n in args.n.split(",")}
    print(f"mtp-plan predictions, {' '.join(BASE)}, {args.device} ({memory_gib:.1f} GiB); fits = peak x "
          f"{1 + FRAGMENTATION:.2f} + {RESERVED_GIB} GiB <= device memory", flush=True)
    for n, impl, ac in (v for v in VARIANTS if v[0] in ns):
        for model in models:
            for world in worlds:
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
                print("row " + json.dumps(row), flush=True)
    for model in models:
        print("\n" + table(out, model), flush=True)
    print_result({"bench": "plan_tables", "device": args.device, "rows": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
