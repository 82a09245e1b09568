"""Per-head validation loss and top-1 accuracy of a multi-token model on a held-out split.

Head i predicts token t+i from position t. For every head this reports the mean cross-entropy
(nats per target token) and the share of positions where the head's argmax equals its target, on
windows of the ``val`` split of the data sources (the trainer's held-out documents). Head 1's
loss is the number to compare with a next-token baseline.

Windows are ``seq_len + lookahead`` tokens, the first ``seq_len`` being the inputs; ``lookahead``
defaults to the model's ``n_future`` (as in the trainer's validation) and can be set larger so
that models with different ``n_future`` are scored on exactly the same windows and targets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mtp_pretrain.data import ArrowTokenStream, DataSource
from mtp_pretrain.loss import IGNORE_INDEX, head_targets
from mtp_pretrain.model.transformer import MTPTransformer, PackedDocuments, shifted_tokens


@dataclass
class PerHeadResult:
    loss: list[float]  # mean cross-entropy of head i+1 (nats per target token)
    accuracy: list[float]  # top-1 accuracy of head i+1
    tokens: list[int]  # target tokens scored per head
    batches: int
    seq_len: int
    lookahead: int
    split: str
    sources: list[str] = field(default_factory=list)

    @property
    def n_future(self) -> int:
        return len(self.loss)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["heads"] = [{"head": i + 1, "loss": l, "accuracy": a, "tokens": t}
                      for i, (l, a, t) in enumerate(zip(self.loss, self.accuracy, self.tokens))]
        return d


@torch.no_grad()
def per_head_sums(model: MTPTransformer, tokens: torch.Tensor, *, seq_len: Optional[int] = None,
                  pad_id: Optional[int] = None,
                  document_end_id: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed CE, correct top-1 count, target count) per head, float64 [n_future] each, for one
    batch ``tokens`` [B, L] (inputs tokens[:, :seq_len], default L - 1; padding is ignored; with
    ``document_end_id``, attention and targets stay inside each packed document, as in training).
    The CE sums equal ``mtp_pretrain.loss.evaluate_loss``'s."""
    n = model.n_future
    T = tokens.shape[1] - 1 if seq_len is None else seq_len
    targets = head_targets(tokens, T, n, pad_id, document_end_id)
    documents = None if document_end_id is None else PackedDocuments.from_tokens(tokens[:, :T], document_end_id)
    z = model.trunk_forward(tokens[:, :T], documents=documents)
    x = z
    # Sums stay on the model's device (no host sync per sequence); one copy at the end.
    ce, correct, count = (torch.zeros(n, dtype=torch.float64, device=tokens.device) for _ in range(3))
    for i in range(1, n + 1):
        h, y = model.head_forward(i, x if model.heads_chain else z, shifted_tokens(tokens, i, T), documents=documents)
        x = h
        tgt = targets[i - 1]
        valid = tgt != IGNORE_INDEX
        # One sequence at a time: a batch's full [B, T, V] logits are never alive at once.
        for b in range(tokens.shape[0]):
            logits = model.unembed(y[b]).float()
            ce[i - 1] += F.cross_entropy(logits, tgt[b], ignore_index=IGNORE_INDEX, reduction="sum").double()
            correct[i - 1] += ((logits.argmax(-1) == tgt[b]) & valid[b]).sum().double()
        count[i - 1] += valid.sum().double()
    return ce.cpu(), correct.cpu(), count.cpu()


@torch.no_grad()
def evaluate_per_head(model: MTPTransformer, sources: Sequence[str | Path | DataSource], *, seq_len: int = 256,
                      batch_size: int = 8, max_batches: Optional[int] = None, split: str = "val",
                      lookahead: Optional[int] = None, seed: int = 0, document_masking: bool = True) -> PerHeadResult:
    """Per-head loss and accuracy over (at most ``max_batches`` batches of) ``split``.

    One pass over the split without repetition (sources mixed by weight, as in training)."""
    n = model.n_future
    lookahead = n if lookahead is None else lookahead
    if lookahead < n:
        raise ValueError(f"lookahead={lookahead} must be >= the model's n_future={n}")
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds model.max_seq_len={model.cfg.max_seq_len}")
    srcs = [s if isinstance(s, DataSource) else DataSource(path=str(s)) for s in sources]
    stream = ArrowTokenStream(srcs, window=seq_len + lookahead, micro_batch_size=batch_size, seed=seed,
                              split=split, prefetch=0, infinite=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ce, correct, count = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    batches = 0
    try:
        for tokens in stream:
            if max_batches is not None and batches >= max_batches:
                break
            s, c, k = per_head_sums(model, tokens.to(device), seq_len=seq_len, pad_id=stream.pad_id,
                                    document_end_id=stream.eos_id if document_masking else None)
            ce, correct, count = ce + s, correct + c, count + k
            batches += 1
    finally:
        model.train(was_training)
    if batches == 0:
        raise ValueError(f"split {split!r} of {[s.path for s in srcs]} has no batch of {batch_size} x "
                         f"{seq_len + lookahead} tokens")
    denom = count.clamp(min=1)
    return PerHeadResult(loss=(ce / denom).tolist(), accuracy=(correct / denom).tolist(),
                         tokens=[int(v) for v in count], batches=batches, seq_len=seq_len,
                         lookahead=lookahead, split=split, sources=[str(s.path) for s in srcs])
