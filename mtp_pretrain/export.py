"""Leave the training format: a consolidated single-file export, and loading models on one
process from either a training checkpoint or an export.

``mtp-export CHECKPOINT OUT_DIR [--format single|hf]``

The single-file export is ``OUT_DIR/model.safetensors`` (the plain model's state dict; a tied
unembedding is stored once, as ``tok_embeddings.weight``), ``OUT_DIR/config.json``
(``{"model": ModelConfig fields, "step": ..., "tokens_seen": ...}``) and the tokenizer
(``tokenizer.json``). CHECKPOINT may be a ``step-N`` folder or a checkpoint root (its newest
complete checkpoint is used); it can come from any strategy and world size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from mtp_pretrain.checkpoint import (DamagedCheckpointError, complete_checkpoints, is_complete, load_dcp,
                                     model_config_of, read_train_state, verify_checkpoint)
from mtp_pretrain.model import ModelConfig, MTPTransformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


def resolve_checkpoint(path: str | Path) -> Path:
    """An export, a complete checkpoint, or a checkpoint root's newest complete checkpoint. A
    training checkpoint is checked (file sizes against its manifest, train_state.json parsed): a
    damaged one is an error naming the file (and, under a root, the newest undamaged checkpoint
    to use instead; a reader does not silently fall back to an older one)."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
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


def read_model_config(path: Path) -> ModelConfig:
    if (path / WEIGHTS_FILE).is_file():
        return ModelConfig(**json.loads((path / CONFIG_FILE).read_text())["model"])
    return model_config_of(path)


def read_state_dict(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The plain model's state dict from an export or a DCP checkpoint (any strategy)."""
    if (path / WEIGHTS_FILE).is_file():
        sd = load_file(path / WEIGHTS_FILE)
        if cfg.tie_embeddings:
            sd["unembed.weight"] = sd["tok_embeddings.weight"]
        return sd
    with torch.device("meta"):
        template = MTPTransformer(cfg).state_dict()
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in template.items()}
    load_dcp(path, {"model": sd})
    return sd


def tokenizer_source(path: Path) -> Optional[Path]:
    if (path / TOKENIZER_FILE).is_file():
        return path / TOKENIZER_FILE
    state = read_train_state(path) if is_complete(path) else {}
    for source in state.get("data_sources", []):
        if (Path(source) / TOKENIZER_FILE).is_file():
            return Path(source) / TOKENIZER_FILE
    return None


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer or None) from an export or a training checkpoint."""
    path = resolve_checkpoint(path)
    cfg = read_model_config(path)
    model = MTPTransformer(cfg)
    model.load_state_dict(read_state_dict(path, cfg))
    tokenizer = None
    if (tok := tokenizer_source(path)) is not None:
        from mtp_pretrain.data import load_tokenizer

        tokenizer = load_tokenizer(tok)
    return model.to(device).eval(), tokenizer


def load_model_weights(model: MTPTransformer, path: str | Path, log: Callable[[str], None] = print) -> None:
    """Initialise ``model`` from a checkpoint/export, possibly with another ``n_future``: the
    trunk, embedding, unembedding and heads 1..min(n, n') are copied exactly; heads the source
    lacks keep their fresh initialisation; the source's extra heads are dropped. Shapes must
    otherwise agree."""
    path = resolve_checkpoint(path)
    src_cfg = read_model_config(path)
    sd = read_state_dict(path, src_cfg)
    n_src, n_dst = src_cfg.n_future, model.cfg.n_future
    kept = {k: v for k, v in sd.items() if not k.startswith("heads.") or int(k.split(".")[1]) < n_dst}
    own = model.state_dict()
    for k, v in kept.items():
        if k not in own:
            raise ValueError(f"init_from {path}: parameter {k} has no counterpart in this model "
                             f"(head_type {src_cfg.head_type} vs {model.cfg.head_type}?)")
        if own[k].shape != v.shape:
            raise ValueError(f"init_from {path}: {k} has shape {tuple(v.shape)} there, {tuple(own[k].shape)} here")
    missing = [k for k in own if k not in kept and not k.startswith("heads.")]
    if missing:
        raise ValueError(f"init_from {path}: missing parameters {missing[:5]}")
    model.load_state_dict(kept, strict=False)
    log(f"initialised from {path}: trunk + heads 1..{min(n_src, n_dst)} copied"
        + (f"; heads {n_src + 1}..{n_dst} freshly initialised" if n_dst > n_src else "")
        + (f"; source heads {n_dst + 1}..{n_src} dropped" if n_src > n_dst else ""))


def export_single_file(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the consolidated export atomically (a temporary folder renamed into place)."""
    path = resolve_checkpoint(checkpoint)
    cfg = read_model_config(path)
    sd = read_state_dict(path, cfg)
    if cfg.tie_embeddings:
        sd.pop("unembed.weight")
    state = read_train_state(path) if is_complete(path) else {}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp / WEIGHTS_FILE)
        from dataclasses import asdict

        (tmp / CONFIG_FILE).write_text(json.dumps(
            {"model": asdict(cfg), "step": state.get("step"), "tokens_seen": state.get("tokens_seen"),
             "source": str(path)}, indent=1))
        if (tok := tokenizer_source(path)) is not None:
            shutil.copy(tok, tmp / TOKENIZER_FILE)
            from mtp_pretrain.data.tokenizer import load_tokenizer, write_role_config

            write_role_config(load_tokenizer(tok), tmp)  # the roles travel with the tokenizer
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="mtp-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="step-N folder, checkpoint root, or an export")
    ap.add_argument("out_dir")
    ap.add_argument("--format", choices=("single", "hf"), default="single",
                    help="single: model.safetensors + config.json; hf: a transformers Llama directory")
    args = ap.parse_args(argv)
    try:
        if args.format == "hf":
            from mtp_pretrain.interop.hf import export_hf

            out = export_hf(args.checkpoint, args.out_dir)
        else:
            out = export_single_file(args.checkpoint, args.out_dir)
    except (ValueError, FileNotFoundError) as e:  # HFInteropError is a ValueError: say why, write nothing
        raise SystemExit(f"mtp-export: {e}")
    print(f"exported {resolve_checkpoint(args.checkpoint)} -> {out}")


if __name__ == "__main__":
    main()
