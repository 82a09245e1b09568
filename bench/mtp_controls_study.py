"""Side-by-side summary of training runs that differ in their MTP controls (docs/mtp_controls.md).

Reads each run directory's metrics.jsonl and reports, at every validation step they share,
``val/loss/head_1`` (the next-token loss) and ``val/accept_per_forward`` (greedy self-speculative
tokens per forward pass); draws both against tokens seen into one PNG.

    python -m bench.mtp_controls_study constant=runs/a step_0.3_0.1=runs/b forward=runs/c \\
        --plot docs/mtp_controls.png

The last line printed is one JSON object: per run, the final validation figures and the tokens
trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import print_result
from mtp_pretrain.metrics import TRAIN_KEY, VAL_KEY, last_per_step, read_metrics


def validation_records(run_dir: Path) -> dict[int, dict]:
    """step -> the last validation record of that step (a resumed run may repeat one), with the
    tokens seen by then (from that step's train record)."""
    try:
        records = read_metrics(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    train = last_per_step(records, TRAIN_KEY)
    return {step: r | {"tokens_seen": train[step]["tokens_seen"] if step in train else None}
            for step, r in last_per_step(records, VAL_KEY).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="name=run_dir")
    ap.add_argument("--plot", help="PNG to write")
    args = ap.parse_args()
    runs = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected name=run_dir")
        runs[name] = validation_records(Path(path))
    steps = sorted(set.intersection(*(set(v) for v in runs.values())))
    if not steps:
        raise SystemExit("the runs share no validation step")
    keys = ("val/loss/head_1", "val/accept_per_forward")
    print("| step | tokens | " + " | ".join(f"{n}: loss/head_1 | {n}: accept/fwd" for n in runs) + " |")
    print("|---|---|" + "---|---|" * len(runs))
    for s in steps:
        first = next(iter(runs.values()))[s]
        cells = [f"{runs[n][s].get(k, float('nan')):.4f}" if k in runs[n][s] else "-" for n in runs for k in keys]
        print(f"| {s} | {first.get('tokens_seen')} | " + " | ".join(cells) + " |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, recs in runs.items():
            xs = [recs[s]["tokens_seen"] or s for s in sorted(recs)]
            for ax, key in zip(axes, keys):
                ax.plot(xs, [recs[s].get(key, float("nan")) for s in sorted(recs)], marker="o", label=name)
        for ax, key in zip(axes, keys):
            ax.set_xlabel("tokens seen")
            ax.set_title(key)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot -> {args.plot}")
    final = {n: {k: v[steps[-1]].get(k) for k in keys + ("tokens_seen", "val/decode_cost")} for n, v in runs.items()}
    print_result({"bench": "mtp_controls_study", "step": steps[-1], "runs": final})


if __name__ == "__main__":
    main()
