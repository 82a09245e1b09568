"""``mtp-plot RUN_DIR [-o OUT.png]``: training curves from ``RUN_DIR/metrics.jsonl`` as one PNG.

Panels: the per-head train loss (solid) with the per-head validation loss (dashed, markers) in
the same colour, the learning rate, throughput (tokens/s over all ranks) and peak memory per
rank. A step logged more than once (a run resumed from an earlier checkpoint re-does the steps
after it) is drawn with its last record, i.e. the attempt that the run continued from.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Optional

from mtp_pretrain.metrics import TRAIN_KEY, VAL_KEY, last_per_step, read_metrics

HEAD_KEY = re.compile(r"^loss/head_(\d+)$")
VAL_HEAD_KEY = re.compile(r"^val/loss/head_(\d+)$")


def step_records(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, validation records) of a run directory or a metrics.jsonl: the last record
    of each step, by step."""
    records = read_metrics(run)
    return list(last_per_step(records, TRAIN_KEY).values()), list(last_per_step(records, VAL_KEY).values())


def _heads(records: list[dict], pattern: re.Pattern) -> list[int]:
    return sorted({int(m.group(1)) for r in records for k in r if (m := pattern.match(k))})


def _series(records: list[dict], key: str, smooth: int = 1) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    steps, values = [s for s, _ in pts], [v for _, v in pts]
    if smooth > 1 and values:
        acc, out = 0.0, []
        for i, v in enumerate(values):  # trailing moving average
            acc += v
            if i >= smooth:
                acc -= values[i - smooth]
            out.append(acc / min(i + 1, smooth))
        values = out
    return steps, values


def plot_run(run: str | Path, out: Optional[str | Path] = None, smooth: int = 1, title: Optional[str] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    train, val = step_records(run)
    if not train and not val:
        raise ValueError(f"{run}: metrics.jsonl holds no step records")
    out = Path(out) if out else (run if run.is_dir() else run.parent) / "metrics.png"

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax_loss, ax_lr, ax_tps, ax_mem = axes.flat
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for h in sorted(set(_heads(train, HEAD_KEY)) | set(_heads(val, VAL_HEAD_KEY))):
        c = colors[(h - 1) % len(colors)]
        ax_loss.plot(*_series(train, f"loss/head_{h}", smooth), color=c, lw=1.2, label=f"head {h} train")
        steps, values = _series(val, f"val/loss/head_{h}")
        if steps:
            ax_loss.plot(steps, values, color=c, ls="--", marker="o", ms=3, label=f"head {h} val")
    ax_loss.set(title="loss per head (cross-entropy, nats)", xlabel="step", ylabel="loss")
    ax_loss.legend(fontsize=7, ncol=2)

    ax_lr.plot(*_series(train, "lr"), color="tab:purple")
    ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    ax_tps.plot(*_series(train, "tokens_per_s", smooth), color="tab:green", label="tokens/s (all ranks)")
    ax_tps.set(title="throughput", xlabel="step", ylabel="tokens / s")
    steps, mfu = _series(train, "mfu", smooth)
    if steps:
        twin = ax_tps.twinx()
        twin.plot(steps, [100 * m for m in mfu], color="tab:gray", lw=0.8, label="MFU %")
        twin.set_ylabel("MFU %")
    ax_mem.plot(*_series(train, "peak_mem_mb"), color="tab:red")
    ax_mem.set(title="peak memory (rank 0)", xlabel="step", ylabel="MiB")

    for ax in axes.flat:
        ax.grid(alpha=0.3)
    last = train[-1] if train else val[-1]
    fig.suptitle(title or f"{run.resolve().name}: step {last['step']}"
                 + (f", {last['tokens_seen']:,} tokens" if "tokens_seen" in last else ""))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="mtp-plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run directory (or its metrics.jsonl)")
    ap.add_argument("-o", "--out", help="PNG to write (default RUN/metrics.png)")
    ap.add_argument("--smooth", type=int, default=1, help="moving average over this many logged steps")
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    print(plot_run(args.run, args.out, args.smooth, args.title))


if __name__ == "__main__":
    main()
