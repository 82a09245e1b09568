"""Helpers for the SLURM integration tests: submit through mtp-submit, poll job state, find tasks.

The tests run against the throw-away cluster of tests/slurm/local_cluster.sh (SLURM_CONF set by
tests/slurm/run_slurm_test.sh); they are marked `slurm` and skipped by a plain `make test`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mtp_pretrain.metrics import last_per_step, read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def submit(*args: str) -> str:
    """Run the project's submit command; return the job id it prints on stdout."""
    proc = subprocess.run([sys.executable, "-m", "mtp_pretrain.launch.submit", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"mtp-submit failed:\n{proc.stdout}\n{proc.stderr}"
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout
    return job_id


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_for_end(job_id: str, timeout: float) -> dict[str, str]:
    """Wait until the job is in a final state (a requeued job passes through PENDING again)."""
    def done():
        info = job_info(job_id)
        return info if info.get("JobState") in FINAL_STATES else None
    return wait_until(done, timeout, f"job {job_id} to end", poll=1.0)


def task_pids(job_id: str, program: str) -> dict[int, int]:
    """{rank: pid} of the job-step processes running `program` (the name of argv[0]).

    `scontrol listpids` lists every process of the job; only the task leaders (our wrapper
    shells) carry a rank there, so the rank is read from each process's SLURM_PROCID."""
    out = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True).stdout
    pids = {}
    for line in out.splitlines()[1:]:   # PID JOBID STEPID LOCALID GLOBALID
        fields = line.split()
        if len(fields) != 5 or not fields[2].isdigit():   # skip the batch step
            continue
        proc = Path("/proc") / fields[0]
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if Path(argv0).name.startswith(program) and b"SLURM_PROCID" in env:
            pids[int(env[b"SLURM_PROCID"])] = int(fields[0])
    return pids


def metrics(run_dir: Path) -> dict[int, float]:
    """step -> loss from <run_dir>/metrics.jsonl; a step logged twice keeps its last value."""
    return {step: r["loss"] for step, r in last_per_step(read_metrics(run_dir, missing_ok=True)).items()}


def batch_log(run_dir: Path, job_id: str) -> str:
    return (Path(run_dir) / "slurm" / f"job-{job_id}.out").read_text()


def rank_log(run_dir: Path, job_id: str, restart: int, rank: int) -> str:
    return (Path(run_dir) / "slurm" / f"job-{job_id}" / f"restart-{restart}" / f"rank-{rank}.log").read_text()
