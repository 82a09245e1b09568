"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of ``checkpoint.dir``::

    step-00000100/          a complete checkpoint: DCP shards + .metadata, train_state.json,
        .metadata           rng/rank-00000.pt ...
        train_state.json    step, tokens seen, data-loader state, wandb run id, ...
    step-00000200/
    latest                  name of the newest complete checkpoint
    .tmp-step-00000300/     a save in progress (or a crashed one): never read

Every rank writes its shards into ``.tmp-step-N``; after a barrier rank 0 adds
``train_state.json`` (last, so its presence marks completeness), renames the folder to
``step-N`` (atomic on POSIX), then atomically replaces ``latest``. A crash at any point leaves the
previous checkpoint and pointer untouched. Model and optimizer state are saved with FQN keys via
``torch.distributed.checkpoint.state_dict``, so a checkpoint written under one strategy and world
size loads under another (DCP reshards on load).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mtp_pretrain.parallel.setup import DistEnv

# One process without a process group is a supported case of DCP, not a mistake worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAIN_STATE = "train_state.json"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file()


def find_latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (the ``latest`` pointer if it names a
    complete one, else the highest complete step-N), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p))
    return steps[-1][1] if steps else None


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class CheckpointManager:
    def __init__(self, root: Path, keep: int, env: DistEnv):
        self.root, self.keep, self.env = Path(root), max(1, keep), env

    def save(self, step: int, state: dict[str, Any], train_state: dict) -> Path:
        """``state``: DCP-saveable (tensors / Stateful objects), written by every rank."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / "rng").mkdir()
        _barrier(self.env)
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / "rng" / f"rank-{self.env.rank:05d}.pt")
        _barrier(self.env)
        if self.env.is_main:
            _fsync_write(tmp / TRAIN_STATE, json.dumps({**train_state, "world_size": self.env.world_size}, indent=1))
            if final.exists():  # an older run's checkpoint of the same step: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_write(self.root / "latest.tmp", final.name)
            os.replace(self.root / "latest.tmp", self.root / "latest")
            self._prune()
        _barrier(self.env)
        return final

    def load(self, path: Path, state: dict[str, Any]) -> dict:
        """Load ``state`` in place from ``path``; returns its train_state. RNG states are
        restored when the world size is unchanged (else the caller reseeds)."""
        path = Path(path)
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (needs .metadata and {TRAIN_STATE})")
        dcp.load(state, checkpoint_id=str(path))
        train_state = json.loads((path / TRAIN_STATE).read_text())
        rng_file = path / "rng" / f"rank-{self.env.rank:05d}.pt"
        if train_state.get("world_size") == self.env.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return train_state

    def _prune(self) -> None:
        complete = sorted((int(m.group(1)), p) for p in self.root.iterdir()
                          if (m := STEP_DIR.match(p.name)) and is_complete(p))
        for _, p in complete[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-step-*"):  # debris of crashed saves
            shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
