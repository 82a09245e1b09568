"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically and verified
before use.

Layout of ``checkpoint.dir``::

    step-00000100/          a complete checkpoint: DCP shards + .metadata, manifest.json,
        .metadata           train_state.json, rng/rank-00000.pt ...
        manifest.json       every other file's size and crc32
        train_state.json    step, tokens seen, data-loader state, wandb run id, ...
    step-00000200/
    latest                  name of the newest complete checkpoint
    .tmp-step-00000300/     a save in progress (or a crashed one): never read
    step-00000400.damaged   a checkpoint that resume=auto found damaged and set aside

Every rank writes its shards into ``.tmp-step-N``; after a barrier the ranks read the files back
in turn for the manifest, then rank 0 writes ``manifest.json`` and ``train_state.json`` (last, so
its presence marks completeness), renames the folder to ``step-N`` (atomic on POSIX), then
atomically replaces ``latest``. A crash at any point leaves the previous checkpoint and pointer
untouched. Model and optimizer state are saved with FQN keys via
``torch.distributed.checkpoint.state_dict``, so a checkpoint written under one strategy and world
size loads under another (DCP reshards on load).

Reading lives in :mod:`mtp_pretrain.checkpoint_reader`, which every reader (resume here,
``train.init_from``, ``mtp-export``, ``mtp-generate``, ``mtp-eval``) goes through: the files are
checked against the manifest before loading (sizes; crc32 too with ``checkpoint.verify=checksum``,
and always after a failed load, to name the file at fault) and ``train_state.json`` is parsed in one
place, so damage is reported as ``DamagedCheckpointError`` naming the checkpoint and the file.
``train.resume=auto`` then falls back to the newest undamaged checkpoint
(:meth:`CheckpointManager.load_newest`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mtp_pretrain.checkpoint_reader import (MANIFEST, STEP_DIR, TRAIN_STATE, CheckpointError, DamagedCheckpointError,
                                            Log, check_model_config, complete_checkpoints, from_main, is_complete,
                                            load_dcp, read_train_state, shared_digests, verify_checkpoint)
from mtp_pretrain.parallel.setup import DistEnv

# --- saving and loading in training -----------------------------------------------------------------
def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class CheckpointManager:
    def __init__(self, root: Path, keep: int, env: DistEnv, log: Optional[Log] = None):
        self.root, self.keep, self.env = Path(root), max(1, keep), env
        self.log = log or (lambda msg: print(msg, flush=True) if env.is_main else None)
        self.last_manifest_s = 0.0  # time the last save spent reading its files back for the manifest

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
        t0 = time.perf_counter()
        names = from_main(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
                           if self.env.is_main else None, self.env)
        digests = shared_digests(tmp, names, self.env, self.log)
        self.last_manifest_s = time.perf_counter() - t0
        if self.env.is_main:
            _fsync_write(tmp / MANIFEST, json.dumps({"checksum": "crc32", "files": digests}, indent=1))
            _fsync_write(tmp / TRAIN_STATE, json.dumps({**train_state, "world_size": self.env.world_size}, indent=1))
            if final.exists():  # an older run's checkpoint of the same step: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_write(self.root / "latest.tmp", final.name)
            os.replace(self.root / "latest.tmp", self.root / "latest")
            self._prune()
        _barrier(self.env)
        return final

    def load(self, path: Path, state: dict[str, Any], verify: str = "size", model_config=None) -> dict:
        """Load ``state`` in place from ``path``; returns its train_state. The files are checked
        against the manifest first (``verify``: size | checksum), and ``model_config`` (the
        current ModelConfig) against the saved one. RNG states are restored when the world size
        is unchanged (else the caller reseeds)."""
        path = Path(path)
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (needs .metadata and {TRAIN_STATE})")
        verify_checkpoint(path, checksums=verify == "checksum", env=self.env, log=self.log)
        train_state = read_train_state(path, ("step", "tokens_seen", "scheduler", "data"))
        if model_config is not None:
            check_model_config(path, train_state, model_config, self.log)
        load_dcp(path, state, self.env, self.log)
        rng_file = path / "rng" / f"rank-{self.env.rank:05d}.pt"
        if train_state.get("world_size") == self.env.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return train_state

    def load_newest(self, state: dict[str, Any], verify: str = "size",
                    model_config=None) -> Optional[tuple[Path, dict]]:
        """resume=auto: load the newest complete checkpoint that is not damaged; (its path, its
        train_state), or None if there is no checkpoint. A damaged one is reported (which file,
        why) and renamed ``step-N.damaged`` so that it is neither tried again nor counted as one
        of the ``keep`` newest. Fails if every checkpoint is damaged rather than start over."""
        damaged = []
        for path in complete_checkpoints(self.root):
            try:
                return path, self.load(path, state, verify, model_config)
            except DamagedCheckpointError as e:
                self.log(f"{e}; falling back to an older checkpoint")
                damaged.append(self._set_aside(path))
        if damaged:
            raise CheckpointError(f"no undamaged checkpoint under {self.root} (set aside: "
                                  f"{', '.join(p.name for p in damaged)}); set train.resume=never to start over")
        return None

    def _set_aside(self, path: Path) -> Path:
        aside = path.with_name(f"{path.name}.damaged")
        if self.env.is_main:
            while aside.exists():
                aside = aside.with_name(aside.name + "-again")
            os.replace(path, aside)
            self.log(f"moved the damaged checkpoint to {aside}")
        _barrier(self.env)
        return aside

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


@contextmanager
def publish_directory(out_dir: str | Path) -> Iterator[Path]:
    """Write a directory all or nothing (the exports): fill the temporary sibling this yields;
    when the block ends without an error it takes ``out_dir``'s place (an existing one is moved
    aside first and removed after), else it is removed and ``out_dir`` stays as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "d")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
