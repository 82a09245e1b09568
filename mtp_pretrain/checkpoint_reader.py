"""Reading a checkpoint: the one place that finds, verifies and reads what training and
``mtp-export`` wrote. Every reader (resume, ``train.init_from``, ``train.init_from_hf``,
``mtp-export``, ``mtp-generate``, ``mtp-eval``) goes through here; :mod:`mtp_pretrain.checkpoint`
writes the training checkpoints and resumes from them with these functions.

Two forms are read:

* a **training checkpoint** ``step-N/`` (layout in :mod:`mtp_pretrain.checkpoint`): DCP shards +
  ``.metadata``, ``manifest.json`` (every other file's size and crc32), ``train_state.json`` (step,
  tokens seen, data-loader state, model config, ...), ``rng/rank-*.pt``; or a checkpoint root
  holding ``step-N`` folders and a ``latest`` pointer;
* a **single-file export** (``mtp-export``): ``model.safetensors`` (the plain model's state dict; a
  tied unembedding stored once, as ``tok_embeddings.weight``), ``config.json`` (``{"model":
  ModelConfig fields, "step", "tokens_seen", "source"}``) and ``tokenizer.json``.

A training checkpoint is checked against its manifest before use (sizes; crc32 too on request,
and always after a failed load, to name the file at fault), and ``train_state.json`` is parsed by
:func:`read_train_state` only, so damage is reported as :class:`DamagedCheckpointError` naming the
checkpoint and the file.

Partial loading (:func:`load_partial_state_dict`) is written once here, for ``train.init_from``
(:func:`load_model_weights`: a checkpoint with another ``n_future``) and for
``train.init_from_hf`` (:func:`mtp_pretrain.interop.hf.load_hf_weights`: a Llama's tensors renamed
to ours).
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException as DCPException

from mtp_pretrain.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from mtp_pretrain.model import ModelConfig, MTPTransformer
from mtp_pretrain.parallel.setup import DistEnv

# One process without a process group is a supported case of DCP, not a mistake worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# A training checkpoint's files.
STEP_DIR = re.compile(r"^step-(\d+)$")
TRAIN_STATE = "train_state.json"
MANIFEST = "manifest.json"
# A single-file export's files (TOKENIZER_FILE: the data pipeline's name, also used by exports).
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

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


# --- finding checkpoints -----------------------------------------------------------------------------
def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file()


def is_export(path: Path) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file()


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


def resolve_checkpoint(path: str | Path) -> Path:
    """An export, a complete checkpoint, or a checkpoint root's newest complete checkpoint. A
    training checkpoint is checked (file sizes against its manifest, train_state.json parsed): a
    damaged one is an error naming the file (and, under a root, the newest undamaged checkpoint
    to use instead; a reader does not silently fall back to an older one)."""
    path = Path(path)
    if is_export(path):
        return path
    if is_complete(path):
        _check(path)
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: neither an export ({WEIGHTS_FILE}), a complete checkpoint, "
                                f"nor a checkpoint directory holding one")
    try:
        _check(found[0])
    except DamagedCheckpointError as e:
        good = _first_undamaged(found[1:])
        raise DamagedCheckpointError(f"{e}; " + (f"the newest undamaged checkpoint there: {good}" if good
                                                 else "no undamaged checkpoint there")) from None
    return found[0]


def _check(path: Path) -> None:
    verify_checkpoint(path)
    read_train_state(path)


def _first_undamaged(checkpoints: list[Path]) -> Optional[Path]:
    for path in checkpoints:
        try:
            _check(path)
            return path
        except DamagedCheckpointError:
            continue
    return None


# --- train_state.json, an export's config.json, and the model config in them ----------------------
def _read_json_object(path: Path, name: str, kind: str, absent: str) -> dict:
    """``path/name`` parsed as a JSON object; a garbled file is a DamagedCheckpointError naming
    ``kind path`` and the file, a missing one a CheckpointError saying ``absent``."""
    try:
        value = json.loads((Path(path) / name).read_bytes())
    except FileNotFoundError:
        raise CheckpointError(absent) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedCheckpointError(f"{kind} {path} is damaged: {name} is not valid JSON "
                                     f"(truncated or overwritten?): {e}") from None
    if not isinstance(value, dict):
        raise DamagedCheckpointError(f"{kind} {path} is damaged: {name} holds a JSON "
                                     f"{type(value).__name__}, expected an object")
    return value


def read_train_state(path: Path, required: tuple[str, ...] = ()) -> dict:
    """``path/train_state.json`` as a dict. Every reader of a checkpoint's train state calls this,
    so a truncated or garbled file gives this one error, naming the file."""
    state = _read_json_object(path, TRAIN_STATE, "checkpoint",
                              f"{path} is not a complete checkpoint: it has no {TRAIN_STATE}")
    missing = [k for k in required if k not in state]
    if missing:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {TRAIN_STATE} lacks {', '.join(missing)}")
    return state


def read_export_config(path: Path) -> dict:
    """An export's ``config.json``: ``{"model": {...}, "step", "tokens_seen", "source"}``."""
    record = _read_json_object(path, CONFIG_FILE, "export", f"export {path} has {WEIGHTS_FILE} but no {CONFIG_FILE}")
    if not isinstance(record.get("model"), dict):
        raise DamagedCheckpointError(f"export {path} is damaged: {CONFIG_FILE} has no \"model\" object")
    return record


def train_state_of(path: Path) -> dict:
    """What is known of the training behind ``path`` (already resolved): a checkpoint's
    train_state; for an export, the train_state of the checkpoint it came from while that still
    exists, else the step and tokens seen its config.json recorded; {} for neither."""
    path = Path(path)
    if is_complete(path):
        return read_train_state(path)
    if is_export(path):
        record = read_export_config(path)
        source = record.get("source")
        if source and is_complete(Path(source)):
            return read_train_state(Path(source))
        return {k: record[k] for k in ("step", "tokens_seen") if record.get(k) is not None}
    return {}


def _model_config(saved: Any, where: str) -> ModelConfig:
    try:
        return ModelConfig(**saved)
    except (TypeError, ValueError) as e:  # an unknown field (a newer version's checkpoint) or a bad value
        raise CheckpointError(f"{where} is not one this version can build: {e}") from None


def model_config_of(path: Path, train_state: Optional[dict] = None) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with (from its train_state.json)."""
    saved = (train_state if train_state is not None else read_train_state(path, ("model_config",)))["model_config"]
    return _model_config(saved, f"checkpoint {path}: the model_config in its {TRAIN_STATE}")


def read_model_config(path: Path) -> ModelConfig:
    """The ModelConfig of an export or a training checkpoint (``path`` already resolved)."""
    if is_export(path):
        return _model_config(read_export_config(path)["model"], f"export {path}: the model in its {CONFIG_FILE}")
    return model_config_of(path)


def check_model_config(path: Path, train_state: dict, current: ModelConfig, log: Log = _stderr) -> None:
    """Refuse to load a checkpoint whose parameters do not fit a model of config ``current``,
    naming the fields that differ (``model.dim: checkpoint 128, config 64``). Differences that
    keep every parameter's shape (rope_theta, max_seq_len, the name...) are allowed and logged."""
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


def tokenizer_source(path: Path) -> Optional[Path]:
    """The tokenizer file of an export, or of a checkpoint's first data source that has one."""
    if (path / TOKENIZER_FILE).is_file():
        return path / TOKENIZER_FILE
    state = read_train_state(path) if is_complete(path) else {}
    for source in state.get("data_sources", []):
        if (Path(source) / TOKENIZER_FILE).is_file():
            return Path(source) / TOKENIZER_FILE
    return None


# --- the manifest -----------------------------------------------------------------------------------
def file_digests(root: Path, names: list[str], log: Optional[Log]) -> dict[str, Optional[dict]]:
    """{name: {"size", "crc32"}} of files under ``root`` (None for a missing one): the manifest's
    entries. crc32 (zlib) reads ~3 GB/s on one core, against ~0.5 GB/s for blake2b: it is here to
    catch truncation and bit rot, not tampering. Shows progress every ~10 s when ``log`` is given."""
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


def shared_digests(root: Path, names: list[str], env: Optional[DistEnv], log: Optional[Log]) -> dict:
    """:func:`file_digests` of ``names``, each file read by one rank (round-robin), the result on
    every rank."""
    if env is None or not env.distributed:
        return file_digests(root, names, log)
    mine = file_digests(root, names[env.rank::env.world_size], log if env.is_main else None)
    parts: list = [None] * env.world_size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def from_main(value: Any, env: Optional[DistEnv]) -> Any:
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
    problem, files = from_main((problem, files), env)
    if problem:
        raise DamagedCheckpointError(problem)
    if files is None:
        if path.resolve() not in _noted_without_manifest:
            _noted_without_manifest.add(path.resolve())
            log(f"checkpoint {path} has no {MANIFEST} (written before manifests): its files are not verified")
        return
    if checksums:
        got = shared_digests(path, sorted(files), env, log)
        for name, want in sorted(files.items()):
            if got[name] != want:
                raise DamagedCheckpointError(
                    f"checkpoint {path} is damaged: {name} has crc32 {got[name] and got[name]['crc32']}, "
                    f"its manifest says {want['crc32']} (altered after the save)")


# --- tensors -----------------------------------------------------------------------------------------
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


def read_state_dict(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The plain model's state dict from an export or a DCP checkpoint (any strategy)."""
    if is_export(path):
        sd = load_file(path / WEIGHTS_FILE)
        if cfg.tie_embeddings:
            sd["unembed.weight"] = sd["tok_embeddings.weight"]
        return sd
    with torch.device("meta"):
        template = MTPTransformer(cfg).state_dict()
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in template.items()}
    load_dcp(path, {"model": sd})
    return sd


def head_index(name: str) -> Optional[int]:
    """i for a parameter of head i+1 (``heads.i.*``), None for the rest of the model."""
    return int(name.split(".")[1]) if name.startswith("heads.") else None


def load_partial_state_dict(model: MTPTransformer, sd: dict[str, torch.Tensor], *, complete_heads: int,
                            where: str, error: type[ValueError] = CheckpointError, hint: str = "") -> None:
    """Load ``sd`` (tensors under this framework's names) into ``model``, which may have another
    number of heads than the source: tensors of heads the model lacks are dropped; every other
    tensor must name a parameter of the model, with its shape; the model's parameters outside the
    heads and those of its first ``complete_heads`` heads must all be given, and the parameters of
    later heads that ``sd`` lacks keep their current (fresh) values. Errors are ``error``s
    starting with ``where`` (``hint`` follows a name the model lacks)."""
    n = model.cfg.n_future
    kept = {k: v for k, v in sd.items() if head_index(k) is None or head_index(k) < n}
    own = model.state_dict()
    for k, v in kept.items():
        if k not in own:
            raise error(f"{where}: parameter {k} has no counterpart in this model{hint}")
        if own[k].shape != v.shape:
            raise error(f"{where}: {k} has shape {tuple(v.shape)} there, {tuple(own[k].shape)} here")
    required = [k for k in own if head_index(k) is None or head_index(k) < complete_heads]
    missing = [k for k in required if k not in kept]
    if missing:
        raise error(f"{where}: missing parameters {missing[:5]}")
    model.load_state_dict(kept, strict=False)


# --- whole models ------------------------------------------------------------------------------------
def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer or None) from an export or a training checkpoint."""
    path = resolve_checkpoint(path)
    cfg = read_model_config(path)
    model = MTPTransformer(cfg)
    model.load_state_dict(read_state_dict(path, cfg))
    tok = tokenizer_source(path)
    return model.to(device).eval(), (load_tokenizer(tok) if tok is not None else None)


def load_model_weights(model: MTPTransformer, path: str | Path, log: Log = print) -> None:
    """``train.init_from``: initialise ``model`` from a checkpoint/export, possibly with another
    ``n_future``: the trunk, embedding, unembedding and heads 1..min(n, n') are copied exactly;
    heads the source lacks keep their fresh initialisation; the source's extra heads are dropped.
    Shapes must otherwise agree."""
    path = resolve_checkpoint(path)
    src_cfg = read_model_config(path)
    n_src, n_dst = src_cfg.n_future, model.cfg.n_future
    load_partial_state_dict(model, read_state_dict(path, src_cfg), complete_heads=min(n_src, n_dst),
                            where=f"init_from {path}",
                            hint=f" (head_type {src_cfg.head_type} vs {model.cfg.head_type}?)")
    log(f"initialised from {path}: trunk + heads 1..{min(n_src, n_dst)} copied"
        + (f"; heads {n_src + 1}..{n_dst} freshly initialised" if n_dst > n_src else "")
        + (f"; source heads {n_dst + 1}..{n_src} dropped" if n_src > n_dst else ""))
