"""Cost of validation decoding (logging.decode_prompts) against the validation loss pass.

Builds the real Trainer from mtp_pretrain/conf/ plus the given overrides (default: the default CPU job), loads
weights with train.init_from (a trained checkpoint: an untrained model's greedy output differs),
and calls its ``validate()`` --rounds times: each call times the loss pass (``val/loss_s``) and
then the decoding (``val/decode_s``), so the two alternate and share the machine's load. Reports
the median of the per-round ratios decode / loss pass.

    python -m bench.val_decode_cost train.init_from=runs/x/checkpoints [more overrides]

The last line printed is one JSON object.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import print_result


def main() -> None:
    overrides = sys.argv[1:]
    rounds = 5
    for a in list(overrides):
        if a.startswith("--rounds="):
            rounds = int(a.split("=", 1)[1])
            overrides.remove(a)
    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.train import Trainer

    cfg = compose_job_config(["logging.wandb.mode=disabled", "train.resume=never"] + overrides)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        try:
            records = []
            for k in range(rounds):
                v = trainer.validate()
                records.append(v)
                print(f"round {k + 1}/{rounds}: loss pass {v['val/loss_s']:.2f}s decode {v['val/decode_s']:.2f}s "
                      f"({100 * v['val/decode_cost']:.1f}%) accept/forward {v['val/accept_per_forward']:.3f}",
                      flush=True)
        finally:
            trainer.close()
    ratios = [r["val/decode_cost"] for r in records]
    print_result({"bench": "val_decode_cost", "decode_cost_median": round(statistics.median(ratios), 4),
                  "decode_cost_rounds": [round(x, 4) for x in ratios],
                  "loss_pass_s_median": round(statistics.median(r["val/loss_s"] for r in records), 3),
                  "decode_s_median": round(statistics.median(r["val/decode_s"] for r in records), 3),
                  "val_batches": cfg.logging.val_batches, "micro_batch_size": cfg.train.micro_batch_size,
                  "seq_len": cfg.data.seq_len, "decode_prompts": cfg.logging.decode_prompts,
                  "decode_new_tokens": cfg.logging.decode_new_tokens,
                  "sources": len(cfg.data.sources)})


if __name__ == "__main__":
    main()
