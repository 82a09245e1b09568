"""Metrics sinks: one console line, ``<run_dir>/metrics.jsonl``, and wandb; and the one reader of
``metrics.jsonl`` (``read_metrics``), used by ``mtp-plot``, the benches and the tests.

Only rank 0 logs. wandb is optional at every step: with no API key it runs offline (``wandb
sync`` uploads later); any wandb error is reported once and logging continues without it, so a
job never blocks or fails on wandb. A resumed run logs into the same wandb run id.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import torch

from mtp_pretrain.config import WandbConfig


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file() and \
        "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore")
    return "online" if has_key else "offline"


METRICS_FILE = "metrics.jsonl"
TRAIN_KEY = "loss"  # every train-step record carries it (and "step")
VAL_KEY = "val/loss"  # every validation record carries it (and "step")


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, master copies and optimizer state this rank holds between steps
    (local shards / ZeRO partitions; each storage counted once)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if not isinstance(t, torch.Tensor):
            return
        if isinstance(t, DTensor):
            t = t.to_local()
        if hasattr(t, "ds_tensor"):  # ZeRO-3: the module parameter is a placeholder
            t = t.ds_tensor
        if t.numel() == 0:
            return
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
    for group in optimizer.param_groups:
        for p in group["params"]:
            add(p)
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:  # not the scalar step counters
                add(v)
    return total


def _drop_unfinished_record(path: Path) -> None:
    """Cut ``path`` back to its last complete line. A job killed while writing can leave a last
    record without its newline; appending after it would glue the next record onto it and make
    a corrupt line in the middle of the file. Its step is re-done by the resumed run anyway."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return  # it ends with a complete record
        end = size
        while end > 0:  # search backwards for the last newline, a block at a time
            start = max(0, end - 65536)
            f.seek(start)
            nl = f.read(end - start).rfind(b"\n")
            if nl >= 0:
                end = start + nl + 1
                break
            end = start
        f.truncate(end)
    print(f"[metrics] {path}: removed an unfinished last record ({size - end} bytes) left by a killed job",
          file=sys.stderr)


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg: WandbConfig, config: dict,
                 wandb_run_id: Optional[str] = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl = None
        self.wandb = None
        self.wandb_run_id = wandb_run_id
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _drop_unfinished_record(self.run_dir / METRICS_FILE)
        self.jsonl = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        mode = wandb_mode(wandb_cfg)
        if mode != "disabled":
            self._start_wandb(wandb_cfg, mode, config)

    def _start_wandb(self, cfg: WandbConfig, mode: str, config: dict) -> None:
        try:
            import wandb

            self.wandb_run_id = self.wandb_run_id or uuid.uuid4().hex[:12]
            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=cfg.tags,
                                    mode=mode, dir=str(self.run_dir), config=config, id=self.wandb_run_id,
                                    resume="allow", settings=wandb.Settings(init_timeout=120, silent=True))
            self.wandb.define_metric("val/*", step_metric="step")
        except Exception as e:  # noqa: BLE001 - wandb must never take the job down
            print(f"[metrics] wandb disabled: {type(e).__name__}: {e}", file=sys.stderr)
            self.wandb = None

    @property
    def wandb_dir(self) -> Optional[str]:
        return str(Path(self.wandb.dir).parent) if self.wandb is not None else None

    def log(self, metrics: dict, console: Optional[str] = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if console:
            print(console, flush=True)
        if self.wandb is not None:
            try:
                self.wandb.log(metrics, step=int(metrics["step"]))
            except Exception as e:  # noqa: BLE001
                print(f"[metrics] wandb logging stopped: {e}", file=sys.stderr)
                self.wandb = None

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass


# --- reading -------------------------------------------------------------------------------------
def metrics_path(run: str | Path) -> Path:
    """``run/metrics.jsonl`` for a run directory; ``run`` itself for a file."""
    path = Path(run)
    return path / METRICS_FILE if path.is_dir() else path


def read_metrics(run: str | Path, missing_ok: bool = False) -> list[dict]:
    """Every record of a run directory's ``metrics.jsonl`` (or of that file), in the order logged.

    A last line without its newline is a record still being written, or one cut short by a killed
    job: it is left out if it does not parse (the writer removes it when the run resumes). Any
    other line that is not a JSON object with a ``step`` is corruption: ``ValueError`` naming the
    file and line. A missing file is ``FileNotFoundError``, or no records with ``missing_ok``.
    """
    path = metrics_path(run)
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"{path}: no {METRICS_FILE} (is {run} a run directory?)")
    lines = path.read_text(errors="replace").split("\n")  # the last item is "" after a final newline
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: unfinished
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg} at column {e.colno}): "
                             f"{line[:120]!r}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{number}: expected a JSON object with a 'step' key, got {line[:120]!r}")
        records.append(record)
    return records


def train_records(records: list[dict]) -> dict[int, list[dict]]:
    """Train-step records (those with ``loss``) by ascending step, every attempt of a step in the
    order logged (a run resumed from an earlier checkpoint logs the steps after it again)."""
    out: dict[int, list[dict]] = {}
    for r in records:
        if TRAIN_KEY in r:
            out.setdefault(r["step"], []).append(r)
    return dict(sorted(out.items()))


def last_per_step(records: list[dict], key: str = TRAIN_KEY) -> dict[int, dict]:
    """The last record carrying ``key`` of each step (the attempt the run continued from), by
    ascending step: ``key=TRAIN_KEY`` for train steps, ``VAL_KEY`` for validations."""
    out = {r["step"]: r for r in records if key in r}
    return dict(sorted(out.items()))
