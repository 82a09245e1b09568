"""What the benchmarks share: launching a fresh process or N ranks of a bench module, reading this
process's memory from /proc, and printing the final one-JSON-line result.

A bench that needs a clean process (its own peak memory) or a process group re-runs itself:

    result = launch(__spec__.name, ["--worker", ...], nproc=2)      # in the parent

    args = parser.parse_args()                                      # in the launched module
    if args.worker:
        write_result(args.result_file, {...}, rank=env.rank)        # rank 0 writes, the others skip

``launch`` appends ``--result-file PATH`` to the arguments, so every launched module's parser
declares ``add_result_file_arg(parser)``. A whole bench launched by another (bench.gpu_acceptance)
hands its final line over with ``print_result(result, args.result_file)``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
# Set by torchrun or a scheduler in the environment of a bench started inside a job: a launched
# rank must take its place in its own group, not the outer one.
_OUTER_GROUP_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                     "MASTER_PORT", "TORCHELASTIC_RUN_ID")


class LaunchError(RuntimeError):
    """A launched bench process failed, timed out or wrote no result."""


def add_result_file_arg(parser) -> None:
    parser.add_argument("--result-file", help="(set by bench.common.launch) where the launched process "
                                              "writes its JSON result")


def launch(module: str, args: Sequence[str] = (), nproc: Optional[int] = None, *, threads: Optional[int] = 1,
           env: Optional[Mapping[str, str]] = None, timeout: float = 3600, what: Optional[str] = None) -> dict:
    """Run ``python -m module *args --result-file F`` from the repository root and return the JSON
    object it wrote to F.

    ``nproc=None``: one fresh Python process. ``nproc=N``: N local ranks under
    ``python -m torch.distributed.run --standalone`` (its rendezvous takes a free port, so two
    launches never collide; a world of one still gets a process group). ``threads`` sets
    OMP_NUM_THREADS (None: inherited); ``env`` adds variables. Output is captured; a non-zero
    exit, ``timeout`` seconds without finishing (the whole process group is killed) or a missing
    result raise ``LaunchError`` with the command and the tail of the output.
    """
    what = what or f"{module} {' '.join(args)}".strip()
    child_env = {k: v for k, v in os.environ.items() if k not in _OUTER_GROUP_VARS}
    if threads is not None:
        child_env["OMP_NUM_THREADS"] = str(threads)
    child_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="mtp_bench_") as tmp:
        result_file = Path(tmp) / "result.json"
        launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone",
                                              f"--nproc-per-node={nproc}"]
        cmd = [sys.executable, *launcher, "-m", module, *args, "--result-file", str(result_file)]
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's ranks too, not only the launcher
            output, _ = proc.communicate()
            raise LaunchError(f"{what}: not finished after {timeout:.0f} s, killed\n"
                              f"command: {shlex.join(cmd)}\n{_tail(output)}") from None
        if proc.returncode != 0:
            raise LaunchError(f"{what}: exit code {proc.returncode}\ncommand: {shlex.join(cmd)}\n{_tail(output)}")
        if not result_file.is_file():
            raise LaunchError(f"{what}: exited 0 but wrote no result to --result-file\n"
                              f"command: {shlex.join(cmd)}\n{_tail(output)}")
        return json.loads(result_file.read_text())


def _tail(output: Optional[str], chars: int = 6000) -> str:
    output = output or ""
    return f"--- last {min(chars, len(output))} of {len(output)} characters of its output ---\n{output[-chars:]}"


def write_result(path: str, result: dict, rank: int = 0) -> None:
    """The launched process's result, for ``launch`` to return (written by rank 0 only)."""
    if rank == 0:
        Path(path).write_text(json.dumps(result))


def print_result(result: dict, result_file: Optional[str] = None) -> None:
    """The bench's final line: one JSON object with its figures (docs/benchmarks.md quotes it).
    ``result_file``: the ``--result-file`` of a bench launched whole by another bench (which then
    gets the same object from ``launch``); None when run by hand."""
    print(json.dumps(result), flush=True)
    if result_file:
        write_result(result_file, result)


# --- this process's memory (Linux /proc) ----------------------------------------------------------
def proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM, RssAnon, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise KeyError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS; False where the kernel
    does not allow it (then VmHWM is the peak of the whole process lifetime)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
