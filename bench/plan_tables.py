"""The ``mtp-plan`` tables of docs/scaling.md: predicted per-rank memory of one FSDP training step
for the 1b, 7b and 70b shapes on 8, 64 and 512 GPUs of 80 GB, n = 1 and 4, head-sequential vs
naive loss, with and without activation checkpointing. Predictions, not measurements.

    .venv/bin/python -m bench.plan_tables                       # everything (tens of minutes on 2 cores)
    .venv/bin/python -m bench.plan_tables --models 1b --worlds 8
    .venv/bin/python -m bench.plan_tables --pp                  # the pipeline table (70b, 512 GPUs)

Each row is one fake step (``mtp_pretrain.plan.plan_step``) of
``model=<m> parallel=fsdp data.seq_len=4096 train.micro_batch_size=1`` with the row's
``model.n_future``, ``loss.impl`` and ``parallel.activation_checkpointing``. For n = 1 the two
losses are the same computation (one head), so only head-sequential is run. Each row is printed
as JSON when done (checkpointed variants first), then one markdown table per model; the last
line is one JSON object with every row.

``--pp``: ``70b`` on 512 GPUs as 8 pipeline stages x FSDP over 64 ranks (``parallel.pp_size=8``,
1f1b, 8 micro-batches per step = ``train.global_batch_tokens`` 2 M tokens, the fewest 1f1b runs on
8 stages), one fake step per pp rank; each row gives the worst pp rank's split and every pp rank's
peak. The trunk's 79 blocks are laid out so that the last stage, which also runs the heads and the
unembedding, gets fewer (``PP_LAYOUT``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.common import print_result
from mtp_pretrain.config import compose_job_config
from mtp_pretrain.plan import CATEGORIES, FRAGMENTATION, GPU_TYPES, RESERVED_GIB, GiB, plan_job, plan_step

BASE = ["parallel=fsdp", "data.seq_len=4096", "train.micro_batch_size=1"]


# (n, loss, AC), in the order they are run: checkpointed rows first (the ones that fit at 4096 tokens).
VARIANTS = [(4, "head_sequential", "full"), (4, "naive", "full"), (1, "head_sequential", "full"),
            (4, "head_sequential", "none"), (4, "naive", "none"), (1, "head_sequential", "none")]


# --pp: (model, GPUs, pp_size) and the trunk blocks of each stage by n (the last stage also runs n
# head blocks and the 128k unembedding).
PP_JOB = ("70b", 512, 8)
PP_LAYOUT = {1: [10, 10, 10, 10, 10, 10, 10, 9], 4: [11, 11, 11, 11, 10, 10, 10, 5]}
PP_VARIANTS = [(4, "head_sequential", "full"), (4, "naive", "full"), (1, "head_sequential", "full"),
               (4, "head_sequential", "none")]


def pp_table(rows: list[dict]) -> str:
    """Markdown for the pipeline rows."""
    lines = ["| GPUs | pp x dp | n | loss | AC | layout | worst pp rank | peak GiB | params | grads | optim | activ "
             "| logits | mask bias | fits | peak GiB per pp rank, 0 .. 7 |", "|" + "---|" * 16]
    for r in rows:
        loss = "head-seq" if r["loss"] == "head_sequential" else "naive"
        lines.append(f"| {r['gpus']} | {r['pp']} x {r['gpus'] // r['pp']} | {r['n']} | {loss} | {r['ac']} | "
                     f"{'-'.join(map(str, r['layout']))} | {r['worst_pp_rank']} | {r['peak_gib']} | "
                     + " | ".join(str(r[c]) for c in CATEGORIES)
                     + f" | {r['mask_bias_gib']} | {'yes' if r['fits'] else 'no'} | "
                     + " / ".join(str(p) for p in r["pp_rank_peaks_gib"]) + " |")
    return "\n".join(lines)


def pipeline_rows(device: str, memory_gib: float) -> list[dict]:
    model, world, pp = PP_JOB
    out = []
    for n, impl, ac in PP_VARIANTS:
        micro_batches = pp
        cfg = compose_job_config([f"model={model}", *BASE, f"model.n_future={n}", f"loss.impl={impl}",
                                  f"parallel.activation_checkpointing={ac}", f"parallel.pp_size={pp}",
                                  "parallel.pp_schedule=1f1b", f"parallel.pp_layout={PP_LAYOUT[n]}",
                                  f"train.global_batch_tokens={micro_batches * 4096 * world // pp}"])
        t0 = time.perf_counter()
        mem = plan_job(cfg, world, device)
        need = mem.predicted * (1 + FRAGMENTATION) + RESERVED_GIB * GiB
        row = {"model": model, "gpus": world, "pp": pp, "schedule": "1f1b", "micro_batches": mem.micro_batches,
               "layout": PP_LAYOUT[n], "n": n, "loss": impl, "ac": ac, "worst_pp_rank": mem.pp_rank,
               "peak_gib": round(mem.predicted / GiB, 2),
               **{c: round(mem.breakdown.get(c, 0) / GiB, 2) for c in CATEGORIES},
               "mask_bias_gib": round(mem.mask_bias_bytes / GiB, 2), "fits": need <= memory_gib * GiB,
               "pp_rank_peaks_gib": [round(s.predicted / GiB, 1) for s in mem.stages],
               "plan_s": round(time.perf_counter() - t0, 1)}
        out.append(row)
        print("row " + json.dumps(row), flush=True)
    return out


def table(rows: list[dict], model: str) -> str:
    """Markdown for one model, rows ordered by GPUs, n, AC, loss."""
    lines = [f"### {model}", "", "| GPUs | n | loss | AC | peak GiB | params | grads | optim | activ | logits "
             "| mask bias | fits | set-up peak |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
    ap.add_argument("--pp", action="store_true", help="the pipeline-parallel table instead (70b, 512 GPUs, PP=8)")
    args = ap.parse_args(argv)
    memory_gib = GPU_TYPES[args.device].memory_gib
    if args.pp:
        print(f"mtp-plan predictions, pipeline: {PP_JOB[0]} on {PP_JOB[1]} x {args.device} ({memory_gib:.1f} GiB), "
              f"{' '.join(BASE)} parallel.pp_size={PP_JOB[2]}", flush=True)
        rows = pipeline_rows(args.device, memory_gib)
        print("\n" + pp_table(rows), flush=True)
        print_result({"bench": "plan_tables", "pipeline": True, "device": args.device, "rows": rows})
        return 0
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
