"""Plug an MTPTransformer into the task scorers: text ``generate`` callables and head-1 logits.

The task modules (polynomial, induction, humaneval) see a model only through plain callables;
this module builds them from a model and a tokenizer.

* ``generate_ids`` decodes token ids greedily (or by sampling) with the key/value-cache decoder
  of ``mtp_pretrain.inference`` (``use_cache=True``, the default) or a small full-recompute loop
  (``full_recompute_greedy``), which the tests compare token for token with the cached decoder.
* ``make_generate`` wraps it as ``generate(prompts, max_new_tokens) -> completions`` over text:
  an optional prefix of token ids (e.g. EOS, which separates documents in the training stream),
  prompts truncated from the left so that prompt + completion fit ``model.max_seq_len``, and
  completions cut at EOS. One decoder serves all its calls, and a seeded sampler gets seed
  ``seed + k`` on its k-th call: pass@k repeats a prompt across batches, and equal seeds would
  make those samples copies of each other.
* ``make_batch_logits`` gives head-1 logits per sequence for ``induction.score_batched``.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

import torch

from mtp_pretrain.inference import Decoder, GenerationConfig
from mtp_pretrain.model.transformer import MTPTransformer


@torch.no_grad()
def full_recompute_greedy(model: MTPTransformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                          eos_id: Optional[int] = None) -> list[list[int]]:
    """Greedy next-token decoding with head 1, recomputing the whole prefix at every step.

    Prompts of different lengths are right-padded: with causal attention the padding never
    influences the positions before it, and each sequence reads its logits at its own last
    position. Generated ids per prompt, EOS included when it stopped the sequence."""
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    capacity = max(lengths) + max_new_tokens
    buf = torch.zeros(len(prompts), capacity, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        buf[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    cur = torch.tensor(lengths, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not active:
            break
        rows = torch.tensor(active, device=device)
        T = int(cur[rows].max())
        z = model.trunk_forward(buf[rows, :T])
        _, y = model.head_forward(1, z)
        last = (cur[rows] - 1)
        nxt = model.unembed(y[torch.arange(len(active), device=device), last]).argmax(-1)
        still = []
        for k, b in enumerate(active):
            t = int(nxt[k])
            out[b].append(t)
            buf[b, cur[b]] = t
            cur[b] += 1
            if not (eos_id is not None and t == eos_id):
                still.append(b)
        active = still
    return out


def generate_ids(model: MTPTransformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 eos_id: Optional[int] = None, mode: str = "greedy", temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, use_cache: bool = True,
                 decoder: Optional[Decoder] = None) -> list[list[int]]:
    """Generated ids per prompt (EOS included when it stopped the sequence).

    ``mode`` is a mode of ``mtp_pretrain.inference`` (greedy, sample, self_speculative, tree);
    with ``use_cache=False`` only greedy decoding is available. ``decoder``: reuse one (of
    ``model``) across calls."""
    if not use_cache:
        if mode not in ("greedy", "self_speculative") or temperature > 0:
            raise RuntimeError(f"decoding mode {mode!r} with temperature {temperature} needs the KV-cache "
                               f"decoder (only greedy full-recompute decoding runs without it)")
        return full_recompute_greedy(model, prompts, max_new_tokens, eos_id)
    kwargs = dict(mode=mode, max_new_tokens=max_new_tokens, eos_id=eos_id, seed=seed)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    decoder = decoder if decoder is not None else Decoder(model)
    return decoder.generate([list(p) for p in prompts], GenerationConfig(**kwargs)).tokens


def make_generate(model: MTPTransformer, tokenizer, *, prefix_ids: Sequence[int] = (),
                  stop_at_eos: bool = True, **decode_kwargs) -> Callable[[list[str], int], list[str]]:
    """``generate(prompts, max_new_tokens) -> completions`` (text, without the prompt).

    ``prefix_ids`` go before every prompt; prompts are cut from the left to leave room for
    ``max_new_tokens`` within ``model.max_seq_len``; completions end before the first EOS."""
    eos = getattr(tokenizer, "eos_id", None) if stop_at_eos else None
    limit = model.cfg.max_seq_len
    decoder = Decoder(model) if decode_kwargs.get("use_cache", True) else None
    seed = decode_kwargs.pop("seed", None)
    calls = itertools.count()

    def generate(prompts: list[str], max_new_tokens: int) -> list[str]:
        max_new = min(max_new_tokens, limit - 1)
        room = limit - max_new
        ids = []
        for p in prompts:
            seq = list(prefix_ids) + tokenizer.encode(p)
            ids.append(seq[-room:] if len(seq) > room else seq)
        call = next(calls)
        outs = generate_ids(model, ids, max_new, eos_id=eos, decoder=decoder,
                            seed=None if seed is None else seed + call, **decode_kwargs)
        texts = []
        for o in outs:
            if eos is not None and eos in o:
                o = o[: o.index(eos)]
            texts.append(tokenizer.decode(o))
        return texts

    return generate


def make_batch_logits(model: MTPTransformer, batch_size: int = 16, prefix_ids: Sequence[int] = ()
                      ) -> Callable[[list[list[int]]], list[torch.Tensor]]:
    """``batch_logits(sequences) -> [len_i, V]`` head-1 logits per sequence (row t predicts
    token t+1), for ``induction.score_batched``. Right-padded batches (causal attention).
    ``prefix_ids`` (e.g. EOS) are fed before each sequence; their rows are dropped."""
    device = next(model.parameters()).device
    prefix = list(prefix_ids)

    @torch.no_grad()
    def batch_logits(seqs: list[list[int]]) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(seqs), batch_size):
            chunk = [prefix + list(s) for s in seqs[start:start + batch_size]]
            T = max(len(s) for s in chunk)
            if T > model.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={model.cfg.max_seq_len}")
            buf = torch.zeros(len(chunk), T, dtype=torch.long, device=device)
            for b, s in enumerate(chunk):
                buf[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            z = model.trunk_forward(buf)
            _, y = model.head_forward(1, z)
            logits = model.unembed(y).float().cpu()
            out.extend(logits[b, len(prefix): len(s)] for b, s in enumerate(chunk))
        return out

    return batch_logits
