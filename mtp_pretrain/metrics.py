"""Metrics sinks: one console line, ``<run_dir>/metrics.jsonl``, and wandb.

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
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
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
