"""A stand-in for `python -m mtp_pretrain.train` that honours the trainer's SLURM contract.

It exists so that the batch script, the submit command and the requeue logic can be tested
without the real model: every rank joins a gloo group (MASTER_ADDR/MASTER_PORT plus torchrun or
SLURM variables), each step sleeps a little and all-reduces (so a dead rank blocks the others,
as in real training), rank 0 appends {"step", "loss"} to <run_dir>/metrics.jsonl, a checkpoint
(one JSON file) is written every `checkpoint.interval` steps, `train.resume=auto` resumes from
it, and SIGUSR1/SIGTERM make every rank finish its step, checkpoint and exit with 75.

usage: python -m tests.slurm.fake_trainer hydra.run.dir=D checkpoint.dir=C checkpoint.interval=N
           train.max_steps=N train.resume=auto [fake.step_seconds=S] [other keys are ignored]
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

# Catch the preemption signals before the slow `import torch`, so that none is lost at start-up.
STOP = {"signal": 0}


def _on_signal(signum, _frame):
    STOP["signal"] = signum


signal.signal(signal.SIGUSR1, _on_signal)
signal.signal(signal.SIGTERM, _on_signal)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

EXIT_PREEMPTED = 75


def parse_overrides(argv: list[str]) -> dict[str, str]:
    return dict(a.lstrip("+").split("=", 1) for a in argv if "=" in a)


def init_distributed() -> tuple[int, int]:
    env = os.environ
    if "RANK" in env:   # torchrun
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    else:               # srun, one process per rank
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    dist.init_process_group("gloo", init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=60))
    return rank, world


def main() -> int:
    cfg = parse_overrides(sys.argv[1:])
    run_dir = Path(cfg["hydra.run.dir"])
    ckpt = Path(cfg["checkpoint.dir"]) / "latest.json"
    interval = int(cfg.get("checkpoint.interval", 5))
    max_steps = int(cfg.get("train.max_steps", 20))
    step_seconds = float(cfg.get("fake.step_seconds", 0.2))

    rank, world = init_distributed()
    run_dir.mkdir(parents=True, exist_ok=True)
    step = 0
    if cfg.get("train.resume") == "auto" and ckpt.exists():
        step = json.loads(ckpt.read_text())["step"]
        print(f"rank {rank}: resumed from {ckpt} at step {step}", flush=True)

    def save() -> None:
        if rank == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            os.replace(tmp, ckpt)   # atomic publish
            print(f"rank 0: checkpoint at step {step}", flush=True)
        dist.barrier()

    while step < max_steps:
        time.sleep(step_seconds)
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value)
        step += 1
        loss = 10.0 / step + value.item() / 100.0   # deterministic in (step, world size)
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        # Every rank must agree to stop after the same step, whichever rank saw the signal.
        flag = torch.tensor([float(STOP["signal"])])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            print(f"rank {rank}: signal {int(flag.item())} -> checkpoint at step {step}, exit {EXIT_PREEMPTED}", flush=True)
            save()
            dist.destroy_process_group()
            # Ranks never leave at exactly the same moment; make the gap visible so that the
            # tests catch a launcher that kills the stragglers (srun --kill-on-bad-exit).
            time.sleep(float(cfg.get("fake.exit_skew_s", 1.0)) * rank)
            return EXIT_PREEMPTED
        if step % interval == 0:
            save()
    save()
    print(f"rank {rank}: done at step {step}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
