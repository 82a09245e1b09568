"""Shared fixtures and helpers for tests that run the training job.

Fixtures
--------
``tiny_dataset``   (session) two byte-level datasets of random ids, ``a`` and ``b``, each with a
                   ``train`` and a ``val`` split; a list of their two paths.
``train_overrides`` (session) Hydra overrides for a seconds-long run on ``tiny_dataset``: a tiny
                   n=4 model, seq_len 32, no wandb, a metrics line every step. Extend it:
                   ``train_overrides + ["train.max_steps=6"]`` (later overrides win).
                   Checkpoints every 4 steps (all kept), validation every 4 steps.
``reference_run``  (session) a finished, uninterrupted in-process run of ``train_overrides`` with
                   ``train.max_steps=REF_STEPS`` (12): its run directory, with metrics.jsonl and
                   checkpoints step-4/8/12. Treat it as read-only; copy what you modify.

Helpers (import them: ``from conftest import run_inprocess, ...``)
-------
``run_inprocess(overrides, run_dir)``   the real Trainer in this process (the fast path);
                                        returns ``(exit code, metrics records)``.
``cli_command(overrides, run_dir, nproc)`` argv of ``python -m mtp_pretrain.train`` (nproc=1) or
                                        of ``torchrun --standalone`` (nproc>1).
``run_cli(...)``                        run that command to completion (CompletedProcess).
``start_cli(...)``                      start it in the background (Popen, own session, output
                                        to ``<run_dir>.log``) for signal / kill tests.
``wait_for_checkpoint(ckpt_root, step, proc)`` block until ``latest`` names a step >= ``step``.
``worker_pids(pid)``                    the worker processes below a torchrun.
``read_metrics(run_dir)``               every record of ``<run_dir>/metrics.jsonl``.
``train_records(records)``              step -> list of train records (a re-done step appears
                                        once per attempt).
``loss_keys(n_future)``                 ``["loss", "loss/head_1", ..]``: what equality tests compare.
``assert_same_losses(records, reference, exact=True)`` every attempt of every step logged the
                                        reference's losses (bitwise, or within ``tol``), lr, tokens_seen.
``wandb_history(run_dir)``              the history rows logged to the offline wandb run(s) under
                                        ``<run_dir>/wandb``, read from their ``.wandb`` files.

Threads: torch runs one intra-op thread in the test process and in every job the helpers start
(``OMP_NUM_THREADS``; set ``MTP_TEST_THREADS`` to change it). On a small shared machine two
OpenMP threads per process oversubscribe the cores and make a step 10x slower; and equality
tests need the reference and the resumed run to use the same thread count.

Multi-process tests spawn torchrun; mark them ``@pytest.mark.distributed`` and run them under
``flock /tmp/mtp_heavy.lock`` on a shared machine. Random ids make the losses flat (about
ln 256); that is fine for equality tests, which compare numbers, not learning.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
N_FUTURE = 4
REF_STEPS = 12
THREADS = os.environ.get("MTP_TEST_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(THREADS))


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> list[Path]:
    """Two byte-level sources (vocab 256 + specials): 60k train / 8k val tokens each."""
    from mtp_pretrain.data.synthetic import write_random_dataset

    root = tmp_path_factory.mktemp("tiny_ds")
    paths = []
    for i, name in enumerate(("a", "b")):
        write_random_dataset(root / name, {"train": 60_000, "val": 8_000}, doc_len=300, seed=10 + i)
        paths.append(root / name)
    return paths


def tiny_overrides(dataset: Sequence[Path]) -> list[str]:
    a, b = dataset
    return [
        f"data.sources=[{{path:{a},weight:0.7}},{{path:{b},weight:0.3}}]",
        "model=tiny", "model.vocab_size=320", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
        f"model.n_future={N_FUTURE}", "model.max_seq_len=128",
        "data.seq_len=32", "data.prefetch=1", "train.micro_batch_size=4",
        "train.max_steps=8", "train.device=cpu", "train.dtype=float32",
        "optim.warmup_steps=2", "logging=quiet", "logging.val_interval=4", "logging.val_batches=1",
        "checkpoint.interval=4", "checkpoint.keep=10",
    ]


@pytest.fixture(scope="session")
def train_overrides(tiny_dataset) -> list[str]:
    return tiny_overrides(tiny_dataset)


@pytest.fixture(scope="session")
def reference_run(train_overrides, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, records = run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS}"], run_dir)
    assert code == 0 and sorted(train_records(records)) == list(range(1, REF_STEPS + 1))
    return run_dir


# --- running the job -------------------------------------------------------------------------------
def run_inprocess(overrides: Sequence[str], run_dir: Path) -> tuple[int, list[dict]]:
    """Compose mtp_pretrain/conf/ + overrides and run the Trainer here (no Hydra app, no subprocess)."""
    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.train import run

    cfg = compose_job_config(list(overrides))
    code = run(cfg, Path(run_dir))
    return code, read_metrics(run_dir)


def cli_command(overrides: Sequence[str], run_dir: Path, nproc: int = 1) -> list[str]:
    args = ["-m", "mtp_pretrain.train", *overrides, f"hydra.run.dir={run_dir}"]
    if nproc == 1:
        return [sys.executable, *args]
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args]


def _env() -> dict:
    env = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="session")
def byte_file(tmp_path_factory) -> Path:
    """A saved byte-level tokenizer (vocab 259: bytes + PAD/BOS/EOS)."""
    from mtp_pretrain.data import ByteTokenizer

    path = tmp_path_factory.mktemp("byte_tok") / "tokenizer.json"
    ByteTokenizer().save(path)
    return path


WORKER = REPO / "tests" / "parallel_worker.py"


def launch_worker(out: Path, nproc: int, runs: list[dict], timeout: float = 600) -> dict[str, dict]:
    """Run ``tests/parallel_worker.py``'s runs (several trainings in one process group; torchrun
    for nproc > 1); {run name: its result.json, plus "dir"}.

    Each rank's stdout/stderr goes to its own file (``<out>/logs/<run id>/attempt_0/<local
    rank>/``), so that a failure shows the first failing rank's own error, not the others'
    echoes of it."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "runs": runs}))
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--log-dir={out / 'logs'}", "--redirects=3"]
           if nproc > 1 else [sys.executable]) + [str(WORKER), str(spec)]
    p = subprocess.run(cmd, cwd=REPO, env=dict(_env(), DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode:
        pytest.fail(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
                    + (rank_logs(out / "logs", p.stderr) if nproc > 1 else ""))
    return {r["name"]: json.loads((out / r["name"] / "result.json").read_text()) | {"dir": str(out / r["name"])}
            for r in runs}


def rank_logs(log_dir: Path, launcher_stderr: str) -> str:
    """The tails of the per-rank logs of a failed torchrun launch: in full for the rank torchrun
    names as the root cause (first observed failure), a few lines for the others."""
    cause = re.search(r"Root Cause.*?local_rank: (\d+)", launcher_stderr, re.S)
    first = cause.group(1) if cause else None
    text, jobs = "", sorted(log_dir.glob("*/"), key=lambda d: d.stat().st_mtime)  # this launch's: the newest
    for rank_dir in sorted(jobs[-1].glob("attempt_*/*") if jobs else [], key=lambda d: (d.name != first, d.name)):
        full = first in (None, rank_dir.name)
        for stream, size in (("stdout", 2000 if full else 500), ("stderr", 6000 if full else 800)):
            f = rank_dir / f"{stream}.log"
            tail = f.read_text(errors="replace")[-size:] if f.exists() else "(no file)"
            mark = " (root cause)" if rank_dir.name == first else ""
            text += f"\n--- local rank {rank_dir.name}{mark} {stream} ---\n{tail}"
    return text


def run_cli(overrides: Sequence[str], run_dir: Path, nproc: int = 1, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run the job to completion; with check, fail the test on a non-zero exit, showing its output."""
    p = subprocess.run(cli_command(overrides, run_dir, nproc), cwd=REPO, env=_env(), text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"training job exited {p.returncode}:\n{p.stdout[-6000:]}")
    return p


def start_cli(overrides: Sequence[str], run_dir: Path, nproc: int = 1) -> subprocess.Popen:
    """Start the job in the background in its own session; output in ``<run_dir>.log``."""
    Path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{run_dir}.log", "w")
    return subprocess.Popen(cli_command(overrides, run_dir, nproc), cwd=REPO, env=_env(), text=True,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def log_text(run_dir: Path) -> str:
    path = Path(f"{run_dir}.log")
    return path.read_text() if path.is_file() else ""


def latest_step(ckpt_root: Path) -> Optional[int]:
    pointer = Path(ckpt_root) / "latest"
    try:
        return int(pointer.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_for_checkpoint(ckpt_root: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    """Poll until ``ckpt_root/latest`` names a step >= ``step``; returns that step. Fails the test
    if the process exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = latest_step(ckpt_root)
        if s is not None and s >= step:
            return s
        if proc.poll() is not None:
            pytest.fail(f"job exited {proc.returncode} before checkpoint step {step}")
        time.sleep(0.01)
    pytest.fail(f"no checkpoint of step >= {step} within {timeout}s")


def worker_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (a torchrun agent's workers)."""
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=False)]


# --- reading the results ---------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(records: list[dict]) -> dict[int, list[dict]]:
    """Train-step records (those with a ``loss`` key) by step; several if a step was re-done."""
    out: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        if "loss" in r:
            out[r["step"]].append(r)
    return dict(out)


def loss_keys(n_future: int = N_FUTURE) -> list[str]:
    return ["loss"] + [f"loss/head_{i}" for i in range(1, n_future + 1)]


def assert_same_losses(records: list[dict], reference: list[dict], exact: bool = True, tol: float = 1e-4,
                       steps=range(1, REF_STEPS + 1)) -> None:
    """Every record of each step in ``steps`` (all attempts) carries the reference's losses, lr
    and tokens_seen."""
    got, ref = train_records(records), train_records(reference)
    assert sorted(got) == list(steps), f"logged steps {sorted(got)}"
    for step in steps:
        want = ref[step][-1]
        for attempt in got[step]:
            for k in loss_keys():
                if exact:
                    assert attempt[k] == want[k], f"step {step} {k}: {attempt[k]!r} != {want[k]!r}"
                else:
                    assert abs(attempt[k] - want[k]) <= tol, f"step {step} {k}: {attempt[k]} vs {want[k]}"
            assert attempt["lr"] == pytest.approx(want["lr"], rel=1e-12), f"step {step} lr"
            assert attempt["tokens_seen"] == want["tokens_seen"], f"step {step} tokens_seen"


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows (key -> JSON value) of every ``<run_dir>/wandb/*run-*/*.wandb`` transaction log.

    The file is wandb's record log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
    of records, each a 7-byte header (crc32, length, type: full/first/middle/last) and a slice of
    a serialized ``wandb_internal_pb2.Record``.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    block, rows = 32768, []
    for path in sorted(Path(run_dir).glob("wandb/*run-*/*.wandb")):
        data = path.read_bytes()
        if data[:4] != b":W&B":
            raise ValueError(f"{path}: not a wandb transaction log (header {data[:7]!r})")
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # block trailer padding
                pos += left
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:  # zero padding to the end of the block
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (2, 3):  # first / middle
                pending = (pending if kind == 3 else b"") + chunk
                continue
            raw, pending = (pending + chunk if kind == 4 else chunk), b""
            record = pb.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
