"""Decoding speed measured during validation: the real greedy self-speculative decoder
(``mtp_pretrain.inference``) on a few held-out prompts of each validation source.

Prompts: the first ``logging.decode_prompt_tokens`` tokens of the first ``logging.decode_prompts``
windows of each source's ``val`` split (the same prompts at every validation, so the figures
compare across steps). Decoding: greedy self-speculative with every extra head drafting
(``num_drafts = n - 1``), ``logging.decode_new_tokens`` tokens per prompt, no EOS stop (a fixed
budget), every source's prompts in one batch (a decoding pass costs about the same for 4 or 8
rows of a small model, so one batch halves the cost against one batch per source). The prompts are written to ``<run_dir>/decode_prompts.json`` so
that ``mtp-generate --mode self_speculative --num-drafts <n-1> --no-eos`` reproduces the figures
from a checkpoint (docs/mtp_controls.md).

Logged: ``val/accept_per_forward`` (generated tokens / forward passes, over every prompt),
``val/accept_per_forward/<source>``, ``val/accept_rate/pos_k`` (k = 1..n-1: how often the draft
k+1 tokens ahead was accepted), and ``val/decode_s`` (its cost in seconds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mtp_pretrain.data import ArrowTokenStream, DataSource
from mtp_pretrain.inference import Decoder, GenerationConfig


def held_out_prompts(paths: list[str], n_prompts: int, prompt_tokens: int, seed: int) -> dict[str, list[list[int]]]:
    """{source name: n_prompts prompts of prompt_tokens ids} from each source's val split."""
    prompts = {}
    for path in paths:
        stream = ArrowTokenStream(sources=[DataSource(path=path, weight=1.0)], window=prompt_tokens,
                                  micro_batch_size=n_prompts, seed=seed, split="val", prefetch=0, infinite=False)
        batch = next(iter(stream))
        stream.close()
        name = Path(path).name
        if name in prompts:  # two sources with one folder name: keep both apart
            name = f"{name}_{len(prompts)}"
        prompts[name] = batch.tolist()
    return prompts


def generation_config(n_future: int, new_tokens: int) -> GenerationConfig:
    return GenerationConfig(mode="self_speculative", max_new_tokens=new_tokens, num_drafts=n_future - 1,
                            eos_id=None, seed=0)


@torch.no_grad()
def measure_decoding(model, prompts: dict[str, list[list[int]]], new_tokens: int) -> dict[str, float]:
    """Decode every source's prompts (together, in prompts' order) and return the val/ metrics above."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    names = [name for name, batch in prompts.items() for _ in batch]
    stats = Decoder(model).generate([p for batch in prompts.values() for p in batch],
                                    generation_config(model.n_future, new_tokens)).stats
    model.train(was_training)
    out = {}
    for name in prompts:
        seqs = [s for s, source in zip(stats.sequences, names) if source == name]
        out[f"val/accept_per_forward/{name}"] = (sum(s.tokens_generated for s in seqs)
                                                 / max(sum(s.forward_passes for s in seqs), 1))
    accepted, proposed = [0] * (model.n_future - 1), [0] * (model.n_future - 1)
    for seq in stats.sequences:
        for j, (a, p) in enumerate(zip(seq.drafts_accepted, seq.drafts_proposed)):
            accepted[j] += a
            proposed[j] += p
    out["val/accept_per_forward"] = stats.accepted_per_forward
    out |= {f"val/accept_rate/pos_{k + 1}": a / max(p, 1) for k, (a, p) in enumerate(zip(accepted, proposed))}
    out["val/decode_s"] = time.perf_counter() - t0
    return out


def write_prompts(path: Path, prompts: dict[str, list[list[int]]], n_future: int, new_tokens: int) -> None:
    path.write_text(json.dumps({"prompts": prompts, "mode": "self_speculative", "num_drafts": n_future - 1,
                                "max_new_tokens": new_tokens, "eos": None}))
