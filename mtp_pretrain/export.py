"""Leave the training format: a consolidated single-file export or a Hugging Face Llama directory.

``mtp-export CHECKPOINT OUT_DIR [--format single|hf]``

The single-file export is ``OUT_DIR/model.safetensors`` (the plain model's state dict; a tied
unembedding is stored once, as ``tok_embeddings.weight``), ``OUT_DIR/config.json``
(``{"model": ModelConfig fields, "step": ..., "tokens_seen": ..., "source": ...}``) and the
tokenizer (``tokenizer.json``). CHECKPOINT may be a ``step-N`` folder or a checkpoint root (its
newest complete checkpoint is used); it can come from any strategy and world size. Reading
checkpoints and exports (``load_model`` and the rest) is :mod:`mtp_pretrain.checkpoint_reader`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from safetensors.torch import save_file

from mtp_pretrain.checkpoint import publish_directory
from mtp_pretrain.checkpoint_reader import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, read_model_config,
                                            read_state_dict, resolve_checkpoint, tokenizer_source, train_state_of)
from mtp_pretrain.data.tokenizer import load_tokenizer, write_role_config


def export_single_file(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the consolidated export atomically (a temporary folder renamed into place)."""
    path = resolve_checkpoint(checkpoint)
    cfg = read_model_config(path)
    sd = read_state_dict(path, cfg)
    if cfg.tie_embeddings:
        sd.pop("unembed.weight")
    state = train_state_of(path)
    with publish_directory(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(
            {"model": asdict(cfg), "step": state.get("step"), "tokens_seen": state.get("tokens_seen"),
             "source": str(path)}, indent=1))
        if (tok := tokenizer_source(path)) is not None:
            shutil.copy(tok, tmp / TOKENIZER_FILE)
            write_role_config(load_tokenizer(tok), tmp)  # the roles travel with the tokenizer
    return Path(out_dir)


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
