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

Every reader (resume, ``train.init_from``, ``mtp-export``, ``mtp-generate``, ``mtp-eval``) checks
the files against the manifest before loading (sizes; crc32 too with ``checkpoint.verify=checksum``,
and always after a failed load, to name the file at fault) and parses ``train_state.json`` with
:func:`read_train_state`, so damage is reported as :class:`DamagedCheckpointError` naming the
checkpoint and the file. ``train.resume=auto`` then falls back to the newest undamaged checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException as DCPException

from mtp_pretrain.parallel.setup import DistEnv

# One process without a process group is a supported case of DCP, not a mistake worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAIN_STATE = "train_state.json"
MANIFEST = "manifest.json"
VERIFY_MODES = ("size", "checksum")
_READ_CHUNK = 16 << 20
_PROGRESS_EVERY_S = 10.0

Log = Callable[[str], None]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the checkpoint (and the file or
    the config fields at fault)."""


class DamagedCheckpointError(CheckpointError):
    """A file of the checkpoint is missing, truncated, altered or unparsable: an older checkpoint
    of the same run may still be good."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, newest first: the one ``latest`` names (the newest
    published), then the other step-N folders by decreasing step."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p)),
                   reverse=True)
    found = [p for _, p in steps]
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def find_latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (the ``latest`` pointer if it names a
    complete one, else the highest complete step-N), or None."""
    found = complete_checkpoints(root)
    return found[0] if found else None


# --- train_state.json and the model config in it ---------------------------------------------------
def read_train_state(path: Path, required: tuple[str, ...] = ()) -> dict:
    """``path/train_state.json`` as a dict. Every reader of a checkpoint's train state calls this,
    so a truncated or garbled file gives this one error, naming the file."""
    file = Path(path) / TRAIN_STATE
    try:
        state = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint: it has no {TRAIN_STATE}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {TRAIN_STATE} is not valid JSON "
                                     f"(truncated or overwritten?): {e}") from None
    if not isinstance(state, dict):
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {TRAIN_STATE} holds a JSON "
                                     f"{type(state).__name__}, expected an object")
    missing = [k for k in required if k not in state]
    if missing:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {TRAIN_STATE} lacks {', '.join(missing)}")
    return state


def model_config_of(path: Path, train_state: Optional[dict] = None):
    """The ModelConfig a checkpoint was trained with (from its train_state.json)."""
    from mtp_pretrain.model import ModelConfig

    saved = (train_state if train_state is not None else read_train_state(path, ("model_config",)))["model_config"]
    try:
        return ModelConfig(**saved)
    except (TypeError, ValueError) as e:  # an unknown field (a newer version's checkpoint) or a bad value
        raise CheckpointError(f"checkpoint {path}: the model_config in its {TRAIN_STATE} is not one this "
                              f"version can build: {e}") from None


def check_model_config(path: Path, train_state: dict, current, log: Log = _stderr) -> None:
    """Refuse to load a checkpoint whose parameters do not fit a model of config ``current``,
    naming the fields that differ (``model.dim: checkpoint 128, config 64``). Differences that
    keep every parameter's shape (rope_theta, max_seq_len, the name...) are allowed and logged."""
    from dataclasses import asdict

    from mtp_pretrain.model import MTPTransformer

    if "model_config" not in train_state:
        return  # written by a version that did not record it: DCP's own shape checks remain
    saved_cfg = model_config_of(path, train_state)
    saved, now = asdict(saved_cfg), asdict(current)
    diffs = [f"model.{k}: checkpoint {saved[k]!r}, config {now[k]!r}" for k in now if saved[k] != now[k]]
    if not diffs:
        return
    with torch.device("meta"):
        shapes = [{k: tuple(v.shape) for k, v in MTPTransformer(c).state_dict().items()} for c in (saved_cfg, current)]
    if shapes[0] != shapes[1]:
        raise CheckpointError(f"checkpoint {path} was saved from an incompatible model config: " + "; ".join(diffs))
    log(f"checkpoint {path}: model config differs in fields that keep every parameter's shape: " + "; ".join(diffs))


# --- the manifest ---------------------------------------------------------------------------------
def _file_digests(root: Path, names: list[str], log: Optional[Log]) -> dict[str, Optional[dict]]:
    """{name: {"size", "crc32"}} of files under ``root`` (None for a missing one). crc32 (zlib)
    reads ~3 GB/s on one core, against ~0.5 GB/s for blake2b: it is here to catch truncation and
    bit rot, not tampering. Shows progress every ~10 s when ``log`` is given."""
    sizes = {n: (root / n).stat().st_size for n in names if (root / n).is_file()}
    total, done = sum(sizes.values()), 0
    t0 = last = time.monotonic()
    out: dict[str, Optional[dict]] = {}
    for name in names:
        if name not in sizes:
            out[name] = None
            continue
        crc, size = 0, 0
        with open(root / name, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                crc, size, done = zlib.crc32(chunk, crc), size + len(chunk), done + len(chunk)
                if log is not None and time.monotonic() - last > _PROGRESS_EVERY_S:
                    last = time.monotonic()
                    rate = done / (last - t0)
                    log(f"checksums of {root.name}: {done / 2**30:.1f}/{total / 2**30:.1f} GiB "
                        f"({rate / 2**20:.0f} MiB/s, ETA {(total - done) / max(rate, 1):.0f}s)")
        out[name] = {"size": size, "crc32": f"{crc:08x}"}
    return out


def _shared_digests(root: Path, names: list[str], env: Optional[DistEnv], log: Optional[Log]) -> dict:
    """Digests of ``names``, each file read by one rank (round-robin), the result on every rank."""
    if env is None or not env.distributed:
        return _file_digests(root, names, log)
    mine = _file_digests(root, names[env.rank::env.world_size], log if env.is_main else None)
    parts: list = [None] * env.world_size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _from_main(value: Any, env: Optional[DistEnv]) -> Any:
    """Rank 0's ``value`` on every rank."""
    if env is None or not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_manifest(path: Path) -> Optional[dict]:
    """{file: {"size", "crc32"}} of a checkpoint, or None for one written before manifests."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        files = json.loads(file.read_bytes())["files"]
        if not all(isinstance(v.get("size"), int) and isinstance(v.get("crc32"), str) for v in files.values()):
            raise ValueError("an entry lacks size or crc32")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {MANIFEST} is unreadable ({e})") from None
    return files


_noted_without_manifest: set[Path] = set()


def verify_checkpoint(path: Path, checksums: bool = False, env: Optional[DistEnv] = None,
                      log: Log = _stderr) -> None:
    """Raise DamagedCheckpointError naming the first file of ``path``'s manifest that is missing or
    has another size (with ``checksums``: other content). Collective under a process group: rank 0
    checks sizes, the ranks share the reading for checksums, every rank gets the same verdict.
    A checkpoint without a manifest (written before this check existed) passes, said once."""
    path = Path(path)
    problem, files = None, None
    if env is None or env.is_main:
        try:
            files = read_manifest(path)
        except DamagedCheckpointError as e:
            problem = str(e)
        if files is not None:
            for name, want in sorted(files.items()):
                file = path / name
                if not file.is_file():
                    problem = f"checkpoint {path} is damaged: {name} is missing"
                    break
                if (size := file.stat().st_size) != want["size"]:
                    problem = (f"checkpoint {path} is damaged: {name} has {size} bytes, its manifest "
                               f"says {want['size']} (truncated or partly copied?)")
                    break
    problem, files = _from_main((problem, files), env)
    if problem:
        raise DamagedCheckpointError(problem)
    if files is None:
        if path.resolve() not in _noted_without_manifest:
            _noted_without_manifest.add(path.resolve())
            log(f"checkpoint {path} has no {MANIFEST} (written before manifests): its files are not verified")
        return
    if checksums:
        got = _shared_digests(path, sorted(files), env, log)
        for name, want in sorted(files.items()):
            if got[name] != want:
                raise DamagedCheckpointError(
                    f"checkpoint {path} is damaged: {name} has crc32 {got[name] and got[name]['crc32']}, "
                    f"its manifest says {want['crc32']} (altered after the save)")


def load_dcp(path: Path, state: dict, env: Optional[DistEnv] = None, log: Log = _stderr) -> None:
    """``dcp.load(state)`` from ``path``; if it fails, the checksums are verified so that damage
    is reported as such, naming the file, instead of DCP's error."""
    try:
        dcp.load(state, checkpoint_id=str(path))
    # DCP gathers every rank's failure (zip, pickle, shapes) into a CheckpointException, which
    # derives from BaseException, not Exception.
    except (Exception, DCPException) as e:
        verify_checkpoint(path, checksums=True, env=env, log=log)
        cause = ("every file matches its manifest" if (Path(path) / MANIFEST).is_file()
                 else f"it has no {MANIFEST} to check its files against")
        raise CheckpointError(f"checkpoint {path} could not be loaded ({cause}): "
                              f"{type(e).__name__}: {e}") from e


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
        names = _from_main(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
                           if self.env.is_main else None, self.env)
        digests = _shared_digests(tmp, names, self.env, self.log)
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
