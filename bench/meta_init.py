"""Time to first step and set-up memory: meta-device initialisation vs building on the host.

    .venv/bin/python bench/meta_init.py [--model 1b] [--nproc 2] [--strategy fsdp] [--repeats 1] [--no-backward]

Each variant is one torchrun launch of ``tests/meta_init_worker.py`` (mode ``step``) on CPU ranks:
the Trainer's model set-up (``parallel.meta_init=true``: built on the meta device, sharded, each
rank initialising its own shards; ``false``: the whole model built and initialised on every
rank's host, then sharded), then the first step's forward and backward (head-sequential loss,
one micro-batch of ``--seq-len`` tokens), no optimizer step. ``--no-backward``: the forward alone
(per-head losses). On a 24 GB machine 1b on 2 ranks fits only forward-only: gradient shards,
FSDP's unsharded gradients and reduce-scatter buffers on top of the parameter shards got a rank
killed for memory (AdamW's state would add another 13 GB). Launch start-up (imports, process
group) is not counted. Peak RSS is each rank's ``ru_maxrss`` when set-up ends and after the step.
Variants alternate (host, meta, host, meta, ...) so that machine load hits both alike. Both must
give the same losses and gradient norm (same initial weights, same sharding). Ends with one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "meta_init_worker.py"
GIB = 2**30


def launch(out: Path, nproc: int, runs: list[dict]) -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "runs": runs}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), str(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(REPO))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return {r["name"]: json.loads((out / f"{r['name']}.json").read_text()) for r in runs}


def overrides(args, meta: bool) -> list[str]:
    return [f"model={args.model}", f"parallel={args.strategy}", f"parallel.meta_init={str(meta).lower()}",
            "train.device=cpu", f"data.seq_len={args.seq_len}", "train.micro_batch_size=1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--strategy", default="fsdp", choices=["fsdp", "tp", "fsdp_tp"])
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-backward", action="store_true", help="time the first forward only")
    args = ap.parse_args()
    from mtp_pretrain.model import count_parameters, model_config

    full_gib = count_parameters(model_config(args.model))["total"] * 4 / GIB
    runs: dict[str, list[dict]] = {"host": [], "meta": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for variant in ("host", "meta"):
                name = f"{variant}_{i}"
                r = launch(Path(tmp) / name, args.nproc,
                           [{"name": name, "mode": "step", "backward": not args.no_backward,
                             "overrides": overrides(args, variant == "meta")}])[name]
                runs[variant].append(r)
                print(f"{variant:4s} #{i}: set-up {r['setup_s']:.1f}s, first step {r['step_s']:.1f}s, "
                      f"to first step {r['time_to_first_step_s']:.1f}s; peak RSS per rank after set-up "
                      f"{max(r['setup_peak_rss_bytes']) / GIB:.2f} GiB, after the step "
                      f"{max(r['peak_rss_bytes']) / GIB:.2f} GiB; losses {[round(x, 5) for x in r['losses']]}",
                      flush=True)

    def summary(rs: list[dict]) -> dict:
        return {"setup_s": round(statistics.median(r["setup_s"] for r in rs), 2),
                "first_step_s": round(statistics.median(r["step_s"] for r in rs), 2),
                "time_to_first_step_s": round(statistics.median(r["time_to_first_step_s"] for r in rs), 2),
                "setup_peak_rss_gib": round(max(max(r["setup_peak_rss_bytes"]) for r in rs) / GIB, 2),
                "step_peak_rss_gib": round(max(max(r["peak_rss_bytes"]) for r in rs) / GIB, 2)}

    host, meta = summary(runs["host"]), summary(runs["meta"])
    same = all(r["losses"] == runs["host"][0]["losses"] and r["grad_norm"] == runs["host"][0]["grad_norm"]
               for r in runs["host"] + runs["meta"])
    print(json.dumps({"model": args.model, "strategy": args.strategy, "nproc": args.nproc,
                      "first_step": "forward" if args.no_backward else "forward+backward",
                      "full_fp32_gib": round(full_gib, 2), "host": host, "meta": meta,
                      "time_to_first_step_ratio": round(host["time_to_first_step_s"] / meta["time_to_first_step_s"], 2),
                      "same_losses_and_grad_norm": same, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
