"""mtp-submit: run the trainer on SLURM.

One run:   mtp-submit --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 model=tiny train.max_steps=1000
           renders slurm/train.sbatch.template into <run_dir>/slurm/train.sbatch, calls sbatch and
           prints the job id on stdout (everything else goes to stderr).
A sweep:   mtp-submit --multirun model.n_future=1,2,4
           runs the trainer with Hydra's submitit launcher (mtp_pretrain/conf/hydra/launcher/slurm.yaml), one
           SLURM job per point of the sweep; it stays in the foreground until they finish.

The trainer always gets `hydra.run.dir=<run_dir>`, `checkpoint.dir=<run_dir>/checkpoints` and
`train.resume=auto` unless the overrides set them, so a requeued or resubmitted job resumes.
See docs/slurm.md for preemption, restarts and logs.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "slurm" / "train.sbatch.template"
TRAIN_MODULE = "mtp_pretrain.train"

# Paths and names go into #SBATCH lines, which sbatch parses without a shell: keep them plain.
_PLAIN = re.compile(r"^[A-Za-z0-9_./+:@%=,-]+$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# Hydra sweep syntax that only makes sense with --multirun.
_SWEEP_FUNCTIONS = re.compile(r"=\s*(range|choice|glob|interval)\(")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtp-submit",
        description="Submit an mtp_pretrain training run (or a --multirun sweep) to SLURM.",
        epilog="Positional arguments are Hydra overrides for the trainer, e.g. model=tiny train.max_steps=100.",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides passed to the trainer")
    res = p.add_argument_group("resources (#SBATCH)")
    res.add_argument("--nodes", type=int, default=1)
    res.add_argument("--ntasks-per-node", type=int, default=1, help="ranks per node (usually = GPUs per node)")
    res.add_argument("--gpus-per-node", type=int, default=None)
    res.add_argument("--cpus-per-task", type=int, default=1, help="CPUs per rank")
    res.add_argument("--time", default="01:00:00", help="time limit, [D-]HH:MM:SS or minutes")
    res.add_argument("--partition", default=None)
    res.add_argument("--account", default=None)
    res.add_argument("--job-name", default="mtp")
    res.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                     help="extra #SBATCH line, e.g. --sbatch-arg=--mem=64G (repeatable)")
    run = p.add_argument_group("run")
    run.add_argument("--run-dir", default=None, help="default: runs/<job-name>-<date>-<time>")
    run.add_argument("--launcher", choices=["srun", "torchrun"], default="srun",
                     help="srun: one process per rank (default); torchrun: one torchrun per node")
    run.add_argument("--signal-seconds", type=int, default=120,
                     help="USR1 this long before the time limit, to checkpoint and requeue")
    run.add_argument("--max-restarts", type=int, default=3, help="requeues allowed after preemption")
    run.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
    run.add_argument("--module", default=TRAIN_MODULE, help="training module run with python -m")
    run.add_argument("--workdir", default=str(REPO_ROOT), help="working directory of the job")
    run.add_argument("--template", default=str(TEMPLATE))
    run.add_argument("--sbatch", default="sbatch", help="sbatch executable")
    run.add_argument("--dry-run", action="store_true", help="render the script, print its path, do not submit")
    run.add_argument("-m", "--multirun", action="store_true",
                     help="sweep through Hydra's submitit launcher instead (one job per point)")
    return p


# --- rendering ------------------------------------------------------------------------------------

def render(template: str, values: dict[str, str]) -> str:
    """Fill {{name}} placeholders. An #SBATCH line whose value is empty is dropped, and so is a
    line that held only an empty placeholder. Unknown placeholders are an error."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - values.keys())
    if missing:
        raise KeyError(f"template placeholders without a value: {missing}")
    out = []
    for line in template.splitlines():
        names = _PLACEHOLDER.findall(line)
        if names and all(values[n] == "" for n in names):
            if line.startswith("#SBATCH") or not _PLACEHOLDER.sub("", line).strip():
                continue
        out.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "\n".join(out) + "\n"


def _plain(what: str, value: str) -> str:
    if not _PLAIN.match(value):
        raise SystemExit(f"mtp-submit: {what} {value!r} must not contain spaces or shell characters")
    return value


def _has_top_level_comma(value: str) -> bool:
    depth, quote = 0, ""
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        if "=" not in o and not o.startswith("~"):
            raise SystemExit(f"mtp-submit: {o!r} is not a Hydra override (key=value)")
        if _SWEEP_FUNCTIONS.search(o) or _has_top_level_comma(o.split("=", 1)[1] if "=" in o else ""):
            raise SystemExit(f"mtp-submit: {o!r} is a sweep; use --multirun for sweeps")


def _override_keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def trainer_overrides(overrides: list[str], run_dir: Path) -> list[str]:
    """The user's overrides plus what makes a requeued job resume in the same place."""
    keys = _override_keys(overrides)
    defaults = {
        "hydra.run.dir": str(run_dir),
        "checkpoint.dir": str(run_dir / "checkpoints"),
        "train.resume": "auto",
    }
    return [f"{k}={v}" for k, v in defaults.items() if k not in keys] + list(overrides)


def default_run_dir(job_name: str) -> Path:
    return Path("runs") / f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def batch_values(args: argparse.Namespace, run_dir: Path, overrides: list[str]) -> dict[str, str]:
    log_dir = run_dir / "slurm"
    torchrun = args.launcher == "torchrun"
    # No -u: torchrun does not take it; the batch script exports PYTHONUNBUFFERED=1 instead.
    python_args = ["-m", args.module, *trainer_overrides(overrides, run_dir)]
    extra = [f"#SBATCH {_plain('--sbatch-arg', a)}" for a in args.sbatch_arg]
    return {
        "job_name": _plain("--job-name", args.job_name),
        "nodes": str(args.nodes),
        # torchrun starts the ranks itself: one SLURM task per node holding all their CPUs.
        "sbatch_tasks_per_node": "1" if torchrun else str(args.ntasks_per_node),
        "sbatch_cpus_per_task": str(args.cpus_per_task * (args.ntasks_per_node if torchrun else 1)),
        "gpus_per_node": "" if args.gpus_per_node is None else str(args.gpus_per_node),
        "time": _plain("--time", args.time),
        "partition": _plain("--partition", args.partition) if args.partition else "",
        "account": _plain("--account", args.account) if args.account else "",
        "workdir": _plain("--workdir", str(Path(args.workdir).resolve())),
        "torchrun_node": str(REPO_ROOT / "slurm" / "torchrun_node.sh"),
        "run_rank": str(REPO_ROOT / "slurm" / "run_rank.sh"),
        "log_dir": _plain("run dir", str(log_dir)),
        "run_dir": str(run_dir),
        "batch_script": str(log_dir / "train.sbatch"),
        "signal_seconds": str(args.signal_seconds),
        "extra_sbatch_lines": "\n".join(extra),
        "launcher": args.launcher,
        "procs_per_node": str(args.ntasks_per_node),
        "cpus_per_task": str(args.cpus_per_task),
        "max_restarts": str(args.max_restarts),
        "python": shlex.quote(_plain("--python", args.python)),
        "train_args": " ".join(shlex.quote(a) for a in python_args),
    }


def submit_one(args: argparse.Namespace) -> int:
    check_overrides(args.overrides)
    run_dir = Path(args.run_dir or default_run_dir(args.job_name)).resolve()
    values = batch_values(args, run_dir, args.overrides)
    script = Path(values["batch_script"])
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render(Path(args.template).read_text(), values))
    script.chmod(0o755)
    if args.dry_run:
        print(script)
        return 0
    proc = subprocess.run([args.sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        print(f"mtp-submit: sbatch failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]   # --parsable prints "id" or "id;cluster"
    print(job_id)
    print(f"mtp-submit: job {job_id}, run dir {run_dir}\n"
          f"  batch log: {script.parent}/job-{job_id}.out\n"
          f"  rank logs: {script.parent}/job-{job_id}/restart-<n>/\n"
          f"  resume later with: sbatch {script}", file=sys.stderr)
    return 0


# --- sweeps through Hydra's submitit launcher -----------------------------------------------------

def time_to_minutes(limit: str) -> int:
    """SLURM time limit ([D-]HH:MM:SS, HH:MM:SS, MM:SS or MM) in whole minutes, rounded up."""
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if len(parts) == 1:
        h, m, s = (parts[0], 0, 0) if days else (0, parts[0], 0)
    elif len(parts) == 2:
        h, m, s = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
    else:
        h, m, s = parts
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def multirun_command(args: argparse.Namespace) -> list[str]:
    sweep_dir = Path(args.run_dir or default_run_dir(args.job_name)).resolve()
    launcher = {
        "nodes": args.nodes,
        "tasks_per_node": args.ntasks_per_node,
        "cpus_per_task": args.cpus_per_task,
        "gpus_per_node": args.gpus_per_node,
        "timeout_min": time_to_minutes(args.time),
        "partition": args.partition,
        "account": args.account,
        "name": args.job_name,
        "signal_delay_s": args.signal_seconds,
        "max_num_timeout": args.max_restarts,
    }
    keys = _override_keys(args.overrides)
    cmd = [args.python, "-m", args.module, "--multirun", "hydra/launcher=slurm"]
    cmd += [f"hydra.launcher.{k}={v}" for k, v in launcher.items() if v is not None]
    if "hydra.sweep.dir" not in keys:
        # A fixed sweep dir, so that a resubmitted job finds its checkpoints again.
        cmd.append(f"hydra.sweep.dir={sweep_dir}")
    # checkpoint.dir defaults to <the job's output dir>/checkpoints, distinct for each point.
    if "train.resume" not in keys:
        cmd.append("train.resume=auto")
    return cmd + list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.multirun:
        cmd = multirun_command(args)
        print("mtp-submit: " + shlex.join(cmd), file=sys.stderr)
        if args.dry_run:
            return 0
        return subprocess.run(cmd, cwd=args.workdir).returncode
    return submit_one(args)


if __name__ == "__main__":
    sys.exit(main())
