"""Decoding speed: greedy vs self-speculative (fixed and adaptive draft length) vs tree decoding.

    .venv/bin/python -m bench.decode_speed                       # newest runs/*/checkpoints
    .venv/bin/python -m bench.decode_speed --checkpoint runs/X/checkpoints --batch-sizes 1 8
    .venv/bin/python -m bench.decode_speed --random-init --num-prompts 2 --max-new-tokens 32  # smoke test
    .venv/bin/python -m bench.decode_speed --train-steps 200    # quickly trained tiny n=4 model
    .venv/bin/python -m bench.decode_speed --random-init --model-size 124m --breakdown-only  # pass pieces only
    .venv/bin/python -m bench.decode_speed --no-fixed --no-tree --repeats 12  # greedy vs auto, many rounds

Prompts are the first ``--num-prompts`` windows of ``--prompt-len`` tokens of the *val* split of
each data set (``data/default/code``, ``data/default/text``), or the lines of ``--prompts``. For
every data set and batch size the decoders -- greedy, self-speculative with a fixed number of
drafts k = 1..n-1 (``fixed_k``), self-speculative with ``num_drafts="auto"`` (``auto``: k chosen
per pass from measured cost and acceptance) and tree -- decode the same prompts
(``--max-new-tokens``, EOS ignored so every mode generates the same number of tokens); reported:
tokens/s, mean accepted tokens per forward pass, acceptance rate per draft position, speedup over
greedy (``speedup_auto``, ``speedup_fixed``; ``speedup_self_speculative`` is fixed k =
``--num-drafts``, default n-1), the drafts ``auto`` fed per pass (a histogram), and ``exact``:
every speculative output is identical to greedy's, token for token, and ``pass_cost``: what one
speculative pass costs in greedy passes (at batch 1, speedup = accepted_per_forward / pass_cost,
so it says how many accepted tokens a pass must bring to pay for itself). The last line of
output is one JSON object with all of it.

A random-init model's heads do not agree, so it accepts ~1 token per pass and speculative modes
are *slower* than greedy (they run the extra heads for nothing): use it only to check that the
script runs. ``--train-steps`` trains the model briefly on the train split first; only a
properly trained checkpoint gives meaningful speedups.

First it times the pieces of a batch-1 pass (``pass_breakdown``): what verifying k+1 tokens
instead of 1, the drafting heads and the extra unembedding rows cost. Those do not depend on
the weights, so ``--breakdown-only`` with a random model of any size shows how the price of a
speculative pass changes with model size on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time
from pathlib import Path

from bench.common import add_result_file_arg, print_result
import torch
import torch.nn.functional as F

from mtp_pretrain.inference import Decoder, GenerationConfig, RunStats

def decoder_configs(n_future: int, max_new_tokens: int, widths, tree: bool = True, fixed: bool = True
                    ) -> dict[str, GenerationConfig]:
    """greedy, fixed_1..fixed_{n-1}, auto, tree: the decoders every data set and batch size runs."""
    configs = {"greedy": GenerationConfig(mode="greedy", max_new_tokens=max_new_tokens)}
    for k in range(1, n_future if fixed else 1):
        configs[f"fixed_{k}"] = GenerationConfig(mode="self_speculative", max_new_tokens=max_new_tokens, num_drafts=k)
    if n_future > 1:
        configs["auto"] = GenerationConfig(mode="self_speculative", max_new_tokens=max_new_tokens, num_drafts="auto")
    if n_future > 1 and tree:
        configs["tree"] = GenerationConfig(mode="tree", max_new_tokens=max_new_tokens, tree_widths=widths,
                                           num_drafts=None)
    return configs


def newest_checkpoint_dir() -> str | None:
    candidates = [p for p in glob.glob("runs/*/checkpoints") if os.listdir(p)]
    return max(candidates, key=os.path.getmtime) if candidates else None


def load_data_prompts(data_dir: Path, names, num: int, length: int, seed: int) -> dict[str, list[list[int]]]:
    from mtp_pretrain.data import ArrowTokenStream, DataSource

    prompts = {}
    for name in names:
        stream = ArrowTokenStream([DataSource(str(data_dir / name))], window=length, micro_batch_size=num,
                                  split="val", seed=seed, prefetch=0, infinite=False)
        prompts[name] = next(iter(stream)).tolist()
    return prompts


def file_prompts(path: str, tokenizer) -> dict[str, list[list[int]]]:
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if path.endswith(".jsonl"):
        items = [json.loads(line) for line in lines]
        ids = [it["ids"] if "ids" in it else tokenizer.encode(it["prompt"]) for it in items]
    else:
        if tokenizer is None:
            raise SystemExit("--prompts with text lines needs a tokenizer (checkpoint or --data-dir)")
        ids = [tokenizer.encode(line) for line in lines]
    return {Path(path).stem: ids}


def quick_train(model, data_dir: Path, names, steps: int, seq_len: int = 128, batch: int = 8, lr: float = 3e-3):
    """A few optimizer steps of the plain multi-token loss on the train split (smoke testing)."""
    from mtp_pretrain.data import ArrowTokenStream, DataSource

    n = model.n_future
    stream = ArrowTokenStream([DataSource(str(data_dir / name)) for name in names], window=seq_len + n,
                              micro_batch_size=batch, split="train", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step, tokens in zip(range(steps), stream):
        logits = model(tokens, seq_len=seq_len)
        losses = [F.cross_entropy(lg.flatten(0, 1).float(), tokens[:, i + 1: i + 1 + seq_len].flatten())
                  for i, lg in enumerate(logits)]
        opt.zero_grad()
        sum(losses).backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"train step {step}: head losses {[round(x.item(), 3) for x in losses]} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return model.eval()


def run_modes(decoder, prompts, batch_size, configs: dict[str, GenerationConfig], repeats: int
              ) -> tuple[dict[str, list[list[int]]], dict[str, dict]]:
    """Decode all prompts in batches of batch_size with every mode; statistics summed over the
    batches. The modes take turns batch by batch (``repeats`` rounds, round-robin, each round
    starting from the next mode: the mode that runs first on a batch measured ~5 % slower than
    the same mode run later), so that a change in the machine's speed during the run (a shared
    VM's speed drifts by tens of percent over minutes) hits every mode alike instead of biasing
    their ratio. Times are the mean over rounds; ``rounds[mode]`` has each round's total, whose
    spread says how far the ratios can be trusted: on this shared VM the same greedy batch-1
    call measured 182-339 ms within one minute, so a ratio of sums over a few dozen calls moves
    by several percent between runs."""
    tokens = {m: [] for m in configs}
    totals = {m: RunStats(mode=c.mode, batch_size=batch_size) for m, c in configs.items()}
    rounds = {m: [0.0] * repeats for m in configs}
    for r in range(repeats):
        names = list(configs)
        turn = names[r % len(names):] + names[: r % len(names)]
        for i in range(0, len(prompts), batch_size):
            for mode in turn:
                res = decoder.generate(prompts[i: i + batch_size], configs[mode])
                total = totals[mode]
                if r == 0:  # outputs and token-level statistics: once
                    tokens[mode] += res.tokens
                    total.sequences += res.stats.sequences
                    total.forward_passes += res.stats.forward_passes
                    total.head_passes += res.stats.head_passes
                    total.draft_lengths += res.stats.draft_lengths
                    total.probe_passes += res.stats.probe_passes
                total.wall_time_s += res.stats.wall_time_s / repeats
                rounds[mode][r] += res.stats.wall_time_s
    return tokens, {m: t.to_dict() | {"round_times_s": rounds[m]} for m, t in totals.items()}


def pass_breakdown(decoder: Decoder, context: int, k: int, repeats: int = 200) -> dict[str, dict[str, float]]:
    """Median microseconds of the pieces of a batch-1 greedy pass (trunk, head 1, unembedding
    over 1 token) and of a chain pass with k drafts (trunk and head 1 over k+1 tokens,
    verification over k+1 rows, the drafting heads over the accepted inputs -- taken as 2 --, and
    the drafting rows), at a cache holding ``context`` positions. Each pass's pieces run in the
    order a pass runs them and the two passes alternate, so caches are as warm as in decoding.
    Bookkeeping (masks, indexing, stopping) is not included. The pieces do not depend on the
    weights' values, so a random model of any size shows what each costs on this machine."""
    from mtp_pretrain.inference import KVCache

    model, dev = decoder.model, decoder.device
    cache = KVCache(1, context + 2 * (k + 1), decoder.dtype, dev)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context), generator=g).to(dev)
    drafting = [] if model.heads_chain else list(range(2, k + 2))
    decoder.forward_step(prompt, torch.zeros(1, dtype=torch.long, device=dev), [1] + drafting, cache=cache)
    start = torch.tensor([context], device=dev)

    def pass_pieces(T: int, with_drafts: bool) -> dict:
        tokens = torch.randint(0, model.cfg.vocab_size, (1, T), generator=g).to(dev)
        positions = start[:, None] + torch.arange(T, device=dev)
        state = {}

        def trunk():
            cache.prepare(start, T)
            state["z"] = model.trunk_forward(tokens, positions, cache)

        def head1():
            state["h"] = model.head_forward(1, state["z"], None, positions, cache)[1]

        def verify():
            model.unembed(state["h"]).argmax(-1)

        pieces = {"trunk": trunk, "head1": head1, "unembed": verify}
        if with_drafts and drafting:
            acc = min(2, T)

            def drafting_heads():
                cache.prepare(start, acc)
                out = decoder.heads_forward(state["z"][:, :acc], positions[:, :acc], drafting, cache)
                state["d"] = torch.stack([out[i][1][:, acc - 1] for i in drafting], dim=1)

            def draft_unembed():
                model.unembed(state["d"]).argmax(-1)

            pieces.update(drafting_heads=drafting_heads, drafting_unembed=draft_unembed)
        return pieces

    passes = {"greedy": pass_pieces(1, False), f"chain_{k}_drafts": pass_pieces(k + 1, True)}
    times = {p: {name: [] for name in pieces} for p, pieces in passes.items()}
    with torch.inference_mode():
        for r in range(repeats + 10):
            for p, pieces in passes.items():
                for name, fn in pieces.items():
                    t0 = time.perf_counter()
                    fn()
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if r >= 10:  # warm-up rounds
                        times[p][name].append(time.perf_counter() - t0)
    out = {p: {name: round(1e6 * sorted(ts)[len(ts) // 2], 1) for name, ts in pieces.items()}
           for p, pieces in times.items()}
    for p in out:
        out[p]["sum"] = round(sum(out[p].values()), 1)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="export dir or training checkpoint (default: newest runs/*/checkpoints)")
    src.add_argument("--random-init", action="store_true", help="random tiny model (smoke test only)")
    ap.add_argument("--train-steps", type=int, default=0, help="train the model this many steps first")
    ap.add_argument("--model-size", default="tiny", help="model for --random-init / --train-steps")
    ap.add_argument("--n-future", type=int, default=4)
    ap.add_argument("--data-dir", default="data/default")
    ap.add_argument("--datasets", nargs="+", default=["code", "text"])
    ap.add_argument("--prompts", help="prompt file instead of the val splits (text lines, or .jsonl with 'prompt'/'ids')")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tree-widths", default="3,2,1")
    ap.add_argument("--num-drafts", type=int, default=None,
                    help="the fixed k reported as speedup_self_speculative and timed piece by piece (default: n-1)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timing rounds (modes take turns batch by batch)")
    ap.add_argument("--no-tree", action="store_true", help="leave tree mode out (the slowest mode on a CPU)")
    ap.add_argument("--no-fixed", action="store_true",
                    help="only greedy and auto (many rounds of the one comparison that needs them)")
    ap.add_argument("--breakdown-only", action="store_true",
                    help="only time the pieces of a greedy and a speculative pass (any model, even random)")
    add_result_file_arg(ap)
    return ap.parse_args(argv)


def load_decode_model(args, data_dir: Path):
    """(model on args.device in eval mode, its tokenizer or None, a description of where it came from)."""
    tokenizer = None
    if args.random_init or (args.train_steps and not args.checkpoint):
        from mtp_pretrain.model import MTPTransformer, model_config

        model = MTPTransformer(model_config(args.model_size, n_future=args.n_future))
        model.init_weights(args.seed)
        source = f"random-init {args.model_size} n_future={args.n_future}"
    else:
        checkpoint = args.checkpoint or newest_checkpoint_dir()
        if checkpoint is None:
            raise SystemExit("no checkpoint: pass --checkpoint (make train prints its run dir), "
                             "or --random-init / --train-steps N for a smoke test")
        from mtp_pretrain.checkpoint_reader import load_model

        model, tokenizer = load_model(checkpoint)
        source = checkpoint
    if args.train_steps:
        model = quick_train(model, data_dir, args.datasets, args.train_steps)
        source += f" + {args.train_steps} quick training steps"
    model = model.to(args.device).eval()
    if tokenizer is None and (data_dir / args.datasets[0]).is_dir():
        from mtp_pretrain.data import load_tokenizer

        tokenizer = load_tokenizer(data_dir / args.datasets[0])
    return model, tokenizer, source


def batch_entry(rows: dict, configs: dict, fixed: str, n_future: int) -> dict:
    """The figures of one prompt set at one batch size: every mode against greedy."""
    base = rows["greedy"]["tokens_per_s"] or float("nan")
    speedup = {m: round(rows[m]["tokens_per_s"] / base, 3) for m in configs}
    # speedup = accepted_per_forward / pass_cost: what a speculative pass costs in greedy passes.
    ms_per_pass = {m: 1e3 * rows[m]["wall_time_s"] / max(rows[m]["forward_passes"], 1) for m in configs}
    # The spread of auto's speedup between rounds (each round: the same batches, modes in turn).
    per_round = [g / a for g, a in zip(rows["greedy"]["round_times_s"], rows["auto"]["round_times_s"])]
    mean = sum(per_round) / len(per_round)
    stderr = (sum((x - mean) ** 2 for x in per_round) / (len(per_round) - 1) / len(per_round)) ** 0.5 \
        if len(per_round) > 1 else None
    entry = {
        "accepted_per_forward_auto": rows["auto"]["accepted_per_forward"],
        "speedup_auto": speedup["auto"],
        "speedup_auto_per_round": [round(x, 3) for x in per_round],
        "speedup_auto_stderr": None if stderr is None else round(stderr, 3),
        "auto_draft_lengths": {str(j): rows["auto"]["draft_lengths"].count(j) for j in range(n_future)},
        "auto_probe_passes": rows["auto"]["probe_passes"],
        "tokens_per_s": {m: rows[m]["tokens_per_s"] for m in configs},
        "ms_per_forward": {m: round(ms_per_pass[m], 3) for m in configs},
        "acceptance_rate_per_position": {"auto": rows["auto"]["acceptance_rate_per_position"]},
    }
    fixed_speedups = {m.split("_")[1]: speedup[m] for m in configs if m.startswith("fixed_")}
    if fixed_speedups:
        best_k = max(fixed_speedups, key=fixed_speedups.get)
        entry.update({
            "accepted_per_forward": rows[fixed]["accepted_per_forward"],
            "speedup_self_speculative": speedup[fixed],
            "speedup_fixed": fixed_speedups,
            "best_fixed_k": int(best_k),
            "auto_minus_best_fixed": round(speedup["auto"] - fixed_speedups[best_k], 3),
            "pass_cost_self_speculative": round(ms_per_pass[fixed] / ms_per_pass["greedy"], 3),
            "pass_cost_fixed": {m.split("_")[1]: round(ms_per_pass[m] / ms_per_pass["greedy"], 3)
                                for m in configs if m.startswith("fixed_")},
        })
        entry["acceptance_rate_per_position"]["self_speculative"] = rows[fixed]["acceptance_rate_per_position"]
    if "tree" in configs:
        entry.update(accepted_per_forward_tree=rows["tree"]["accepted_per_forward"],
                     speedup_tree=speedup["tree"],
                     pass_cost_tree=round(ms_per_pass["tree"] / ms_per_pass["greedy"], 3))
        entry["acceptance_rate_per_position"]["tree"] = rows["tree"]["acceptance_rate_per_position"]
    return entry


def compare_modes(decoder, datasets: dict, configs: dict, k: int, args, tokenizer, summary: dict) -> None:
    """Every mode on every prompt set and batch size, into ``summary``."""
    fixed = f"fixed_{k}"
    for name, prompts in datasets.items():
        summary["results"][name] = {}
        greedy_by_bs = []
        for bs in args.batch_sizes:
            outputs, rows = run_modes(decoder, prompts, bs, configs, args.repeats)
            for mode in configs:  # the per-pass draft lengths go into the summary as a histogram
                shown = {key: v for key, v in rows[mode].items() if key not in ("draft_lengths", "round_times_s")}
                print(f"{name} bs={bs} {mode:8s} {json.dumps(shown)}", flush=True)
            exact = all(outputs[m] == outputs["greedy"] for m in configs)
            greedy_by_bs.append(outputs["greedy"])
            entry = {"exact": exact, **batch_entry(rows, configs, fixed, decoder.model.n_future)}
            summary["results"][name][str(bs)] = entry
            summary["exact"] &= exact
            summary["min_speedup_auto"] = min(summary.get("min_speedup_auto", float("inf")), entry["speedup_auto"])
            if "auto_minus_best_fixed" in entry:
                summary["min_auto_minus_best_fixed"] = min(summary.get("min_auto_minus_best_fixed", float("inf")),
                                                           entry["auto_minus_best_fixed"])
            print(f"{name} bs={bs}: exact={exact} speedup auto={entry['speedup_auto']} "
                  f"(+-{entry['speedup_auto_stderr']} between rounds) fixed k={entry.get('speedup_fixed')} "
                  f"tree={entry.get('speedup_tree')}; auto fed k per pass {entry['auto_draft_lengths']}; "
                  f"accepted/forward {entry.get('accepted_per_forward')} (k={k}), pass cost "
                  f"{entry.get('pass_cost_fixed')} greedy passes", flush=True)
        summary["exact_across_batch_sizes"] &= all(g == greedy_by_bs[0] for g in greedy_by_bs)
        if tokenizer is not None:
            sample = tokenizer.decode(greedy_by_bs[0][0][:48])
            print(f"{name} sample continuation: {sample!r}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data_dir = Path(args.data_dir)
    model, tokenizer, source = load_decode_model(args, data_dir)
    if args.prompts:
        datasets = file_prompts(args.prompts, tokenizer)
    else:
        datasets = load_data_prompts(data_dir, args.datasets, args.num_prompts, args.prompt_len, args.seed)
    widths = tuple(int(w) for w in args.tree_widths.split(","))
    decoder = Decoder(model)
    k = min(args.num_drafts or model.n_future - 1, model.n_future - 1)
    breakdown = pass_breakdown(decoder, args.prompt_len + args.max_new_tokens // 2, k)
    print(f"pass pieces (median us, batch 1, {k} drafts): {json.dumps(breakdown)}", flush=True)
    if args.breakdown_only:
        print_result({"model": source, "threads": torch.get_num_threads(), "pass_breakdown_us": breakdown},
                     args.result_file)
        return
    print(f"model: {source}; n_future={model.n_future} head_type={model.cfg.head_type}; "
          f"threads={torch.get_num_threads()}", flush=True)
    configs = decoder_configs(model.n_future, args.max_new_tokens, widths, tree=not args.no_tree,
                              fixed=not args.no_fixed)
    # Warm-up: first calls pay for allocator and kernel selection (auto also times its passes).
    for config in configs.values():
        decoder.generate(next(iter(datasets.values()))[:1], dataclasses.replace(config, max_new_tokens=8))
    summary = {"exact": True, "exact_across_batch_sizes": True, "model": source, "threads": torch.get_num_threads(),
               "num_drafts": k, "max_new_tokens": args.max_new_tokens, "pass_breakdown_us": breakdown, "results": {}}
    compare_modes(decoder, datasets, configs, k, args, tokenizer, summary)
    print_result(summary, args.result_file)

if __name__ == "__main__":
    main()
