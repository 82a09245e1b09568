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

Every rank writes its shards into ``.tmp-step-N``, keeping each file's size and crc32 as its bytes
are written (the manifest costs no reading back); after a barrier rank 0 gathers them, checks them
against the files' sizes on disk, and writes ``manifest.json`` and ``train_state.json`` (last, so
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

import io
import json
import os
import shutil
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from mtp_pretrain.checkpoint_reader import (MANIFEST, STEP_DIR, TRAIN_STATE, CheckpointError, DamagedCheckpointError,
                                            Log, check_model_config, complete_checkpoints, is_complete,
                                            file_digests, load_dcp, read_train_state, verify_checkpoint)
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
        self.last_manifest_s = 0.0  # time the last save spent gathering and checking its manifest

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
        writer = DigestingWriter(tmp)
        dcp.save(state, checkpoint_id=str(tmp), storage_writer=writer)
        rng_name = f"rng/rank-{self.env.rank:05d}.pt"
        written = {**writer.digests(tmp), rng_name: _write_digested(tmp / rng_name, rng_state())}
        _barrier(self.env)
        t0 = time.perf_counter()
        digests = manifest_digests(tmp, written, self.env, self.log)
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


# --- the manifest, from the bytes as they are written ---------------------------------------------
class _DigestingFile:
    """A file open for writing that keeps the size and crc32 of what goes through ``write``.
    DCP's writer only writes, tells, flushes and fsyncs; a seek would make the running crc wrong,
    so none is offered (a DCP that seeks fails loudly here rather than record a wrong crc)."""

    def __init__(self, f):
        self._f, self.size, self.crc = f, 0, 0

    def write(self, b) -> int:
        n = self._f.write(b)
        self.crc = zlib.crc32(memoryview(b).cast("B")[:n], self.crc)
        self.size += n
        return n

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()


class _DigestingFileSystem(FileSystem):
    """DCP's local file system, recording {path: {"size", "crc32"}} of every file it writes
    (written from DCP's writer threads: one thread per file)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, dict] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as f:
            if "r" in mode:
                yield f
                return
            stream = _DigestingFile(f)
            yield stream
            with self._lock:
                self.written[str(path)] = {"size": stream.size, "crc32": f"{stream.crc:08x}"}

    def rename(self, path, new_path) -> None:  # .metadata is written as .metadata.tmp, then renamed
        super().rename(path, new_path)
        with self._lock:
            if str(path) in self.written:
                self.written[str(new_path)] = self.written.pop(str(path))


class DigestingWriter(FileSystemWriter):
    """``dcp.save``'s default writer, also giving the size and crc32 of each file it wrote."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.fs = _DigestingFileSystem()

    def digests(self, root: Path) -> dict[str, dict]:
        """{name relative to ``root``: {"size", "crc32"}} of the files this rank wrote."""
        return {str(Path(p).relative_to(root)): d for p, d in self.fs.written.items()}


def _write_digested(path: Path, obj: Any) -> dict:
    """``torch.save(obj)`` to ``path``; the file's {"size", "crc32"}."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    with open(path, "wb") as f:
        f.write(data)
    return {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}


def manifest_digests(root: Path, written: dict[str, dict], env: DistEnv, log: Log) -> Optional[dict[str, dict]]:
    """The manifest's entries on rank 0 (None elsewhere): every rank's ``written`` digests, for
    every file under ``root``. A file that no rank recorded, or whose size on disk differs from
    the recorded one, is read back for its digest (said in the log): the manifest stays true to
    the files if DCP ever writes by another path."""
    parts: Optional[list] = [None] * env.world_size if env.is_main else None
    if env.distributed:
        dist.gather_object(written, parts, dst=0)
    else:
        parts = [written]
    if not env.is_main:
        return None
    recorded = {k: v for part in parts for k, v in part.items()}
    sizes = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    unseen = sorted(n for n, size in sizes.items() if n not in recorded or recorded[n]["size"] != size)
    if unseen:
        log(f"manifest of {root.name}: {len(unseen)} file(s) not seen while writing, read back: "
            f"{', '.join(unseen[:5])}{' ...' if len(unseen) > 5 else ''}")
        recorded |= file_digests(root, unseen, log)
    return {n: recorded[n] for n in sorted(sizes)}


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
