"""``mtp-generate``: decode prompts with a trained multi-token-prediction model on one process.

    mtp-generate CHECKPOINT --prompt "def add(a, b):" --mode self_speculative --max-new-tokens 64
    mtp-generate CHECKPOINT --prompts-file prompts.txt --batch-size 8 --json

CHECKPOINT is an export directory (``mtp-export``) or a training checkpoint (a ``step-N``
folder or a checkpoint root), loaded by ``mtp_pretrain.checkpoint_reader.load_model``. Prompts come from
``--prompt`` (repeatable) and ``--prompts-file`` (one prompt per line; a ``.jsonl`` file holds
one JSON string or ``{"prompt": ...}`` per line, for prompts with newlines). Without a tokenizer,
prompts are comma-separated token ids. Plain output prints each prompt with its completion and
the statistics; ``--json`` prints one JSON object per prompt: prompt, token ids, text, the
sequence's statistics and its batch's statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from mtp_pretrain.checkpoint_reader import CheckpointError, load_model
from mtp_pretrain.inference.decode import MODES, Decoder, GenerationConfig




def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            for line in lines:
                item = json.loads(line)
                prompts.append(item["prompt"] if isinstance(item, dict) else str(item))
        else:
            prompts = lines + prompts  # file first, then --prompt ones
    if not prompts:
        raise SystemExit("mtp-generate: give --prompt and/or --prompts-file")
    return prompts


def encode(prompt: str, tokenizer, prepend: str) -> list[int]:
    if tokenizer is None:
        try:
            ids = [int(t) for t in prompt.replace(" ", "").split(",") if t]
        except ValueError:
            raise SystemExit("mtp-generate: the checkpoint has no tokenizer; give prompts as comma-separated ids")
    else:
        ids = tokenizer.encode(prompt)
    if prepend != "none":
        if tokenizer is None:
            raise SystemExit("mtp-generate: --prepend needs a tokenizer")
        token = tokenizer.bos_id if prepend == "bos" else tokenizer.eos_id
        if token is None:  # BOS is an optional role (GPT-2 style tokenizers have none)
            raise SystemExit(f"mtp-generate: --prepend {prepend}: the tokenizer has no {prepend.upper()} token")
        ids = [token] + ids
    return ids


def num_drafts_arg(value: str):
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of drafts >= 1, got {value!r}")
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of drafts >= 1, got {k}")
    return k


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mtp-generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="export directory or training checkpoint")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--prompts-file", help="one prompt per line (.jsonl: one JSON string or {'prompt': ...})")
    ap.add_argument("--mode", choices=MODES, default="greedy")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature (mode sample: default 1.0; self_speculative: >0 = speculative sampling)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--tree-widths", default="3,2,1", help="tree mode: candidates per draft depth")
    ap.add_argument("--num-drafts", type=num_drafts_arg, default="auto",
                    help="self_speculative: 'auto' (default) chooses the drafts per pass from measured pass cost "
                         "and acceptance; K drafts with heads 2..K+1 every pass. tree: K limits the depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eos-id", type=int, default=None, help="default: the tokenizer's EOS")
    ap.add_argument("--no-eos", action="store_true", help="ignore EOS; always generate max tokens")
    ap.add_argument("--prepend", choices=("none", "bos", "eos"), default="none",
                    help="token put before each prompt (training documents follow an EOS)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    prompts = read_prompts(args)
    try:
        model, tokenizer = load_model(args.checkpoint, device=args.device)
    except (CheckpointError, FileNotFoundError) as e:  # an unusable checkpoint: say why, no traceback
        raise SystemExit(f"mtp-generate: {e}")
    model = model.to(dtype=getattr(torch, args.dtype)).eval()
    eos_id = None if args.no_eos else (args.eos_id if args.eos_id is not None
                                       else getattr(tokenizer, "eos_id", None))
    temperature = args.temperature if args.temperature is not None else (1.0 if args.mode == "sample" else 0.0)
    config = GenerationConfig(mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=temperature,
                              top_p=args.top_p, eos_id=eos_id, seed=args.seed,
                              tree_widths=tuple(int(w) for w in args.tree_widths.split(",")),
                              num_drafts=args.num_drafts)
    decoder = Decoder(model)
    ids = [encode(p, tokenizer, args.prepend) for p in prompts]
    totals = {"forward_passes": 0, "tokens_generated": 0, "wall_time_s": 0.0, "sequence_forward_passes": 0}
    for start in range(0, len(prompts), args.batch_size):
        batch = ids[start: start + args.batch_size]
        result = decoder.generate(batch, config)
        run = result.stats.to_dict()
        totals["forward_passes"] += result.stats.forward_passes
        totals["tokens_generated"] += result.stats.tokens_generated
        totals["sequence_forward_passes"] += result.stats.sequence_forward_passes
        totals["wall_time_s"] += result.stats.wall_time_s
        for j, tokens in enumerate(result.tokens):
            text = tokenizer.decode(tokens) if tokenizer is not None else None
            seq_stats = result.stats.sequences[j].to_dict()
            if args.json:
                print(json.dumps({"index": start + j, "prompt": prompts[start + j], "token_ids": tokens,
                                  "text": text, "stats": seq_stats, "run": run}), flush=True)
            else:
                shown = text if text is not None else ",".join(map(str, tokens))
                print(f"=== [{start + j}] {seq_stats['tokens_generated']} tokens, "
                      f"{seq_stats['accepted_per_forward']} per forward ({seq_stats['finish_reason']})")
                print(prompts[start + j] + shown)
        if not args.json:
            print(f"--- batch {start // args.batch_size}: {json.dumps(run)}")
    if not args.json:
        per_fwd = totals["tokens_generated"] / max(totals["sequence_forward_passes"], 1)
        rate = totals["tokens_generated"] / totals["wall_time_s"] if totals["wall_time_s"] else 0.0
        print(f"--- total: mode={args.mode} tokens={totals['tokens_generated']} "
              f"forward_passes={totals['forward_passes']} accepted_per_forward={per_fwd:.3f} "
              f"tokens_per_s={rate:.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
