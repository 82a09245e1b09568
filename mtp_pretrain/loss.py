"""The multi-token cross-entropy: head i predicts token t+i from position t.

Two implementations with the same numbers and the same interface: each runs every backward
itself and returns detached per-head losses, so a training step calls one of them once per
micro-batch and never calls ``.backward()`` on their result.

* ``naive_loss`` -- every head forward, the weighted sum of their losses, one backward. Peak
  memory holds all n heads' logits (and their graphs) at once: the reference.
* ``head_sequential_loss`` -- the paper's Fig. 2. The trunk runs once; its output z is detached
  into a leaf; each head then runs forward, loss *and backward* in turn, so its logits and their
  gradients are freed before the next head runs, and its gradient accumulates in the leaf's
  ``.grad``; finally the trunk is backpropagated once with that accumulated gradient. Peak memory
  is the trunk's activations plus one head's logits, as for a next-token model.

Both take ``chunk_size``: the shared unembedding then computes the loss over slices of the
tokens (``mtp_pretrain.ops.linear_cross_entropy``) so full B x T x V logits never exist.

Sharding wrappers: the loss only calls modules' ``forward`` (trunk via ``trunk_forward``, each
head, the shared ``unembed``), so each of them can be its own FSDP unit / DeepSpeed partition /
TP-planned module. ``GradSyncHooks`` lets a strategy hold back gradient reduction while a
module's gradient is still accumulating (the shared unembedding receives n backward passes,
one per head; it should be reduced once, after the last).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mtp_pretrain.model.transformer import MTPTransformer, PackedDocuments, shifted_tokens

IGNORE_INDEX = -100


class GradSyncHooks:
    """Called by the loss around its backward passes. The default does nothing (one process,
    or strategies that reduce gradients after the whole step)."""

    def before_head_backward(self, head: int, last: bool) -> None:
        """Before the backward of head ``head``'s loss (1-based); ``last`` for the final head."""

    def before_chained_head_backward(self, head: int) -> None:
        """Causal heads: before the backward through head ``head``'s own layers (1-based). These
        run after every head's loss backward, last head first; head i > 1 embeds tokens, so
        head 2's is the last of them to reach the token embedding."""

    def before_trunk_backward(self) -> None:
        """Before the trunk's single backward pass."""


@dataclass
class MTPLoss:
    loss: torch.Tensor  # detached weighted sum of the per-head mean losses
    per_head: list[torch.Tensor]  # detached mean cross-entropy of each head; NaN for a skipped head
    n_targets: list[int]  # valid target tokens of each head in this micro-batch
    # With ``trunk_output`` given: the scalar whose backward sends the trunk output its gradient
    # (a pipeline schedule backpropagates it through the earlier stages); None otherwise.
    trunk_loss: Optional[torch.Tensor] = None


def head_targets(tokens: torch.Tensor, seq_len: int, n_future: int,
                 pad_id: Optional[int] = None, document_end_id: Optional[int] = None) -> list[torch.Tensor]:
    """targets_i[:, t] = tokens[:, t + i] for i = 1..n; positions past the batch's end, and
    padding, get IGNORE_INDEX (never read past the batch). With ``document_end_id`` a target in
    another document is ignored too: one where an EOS lies in tokens[t .. t+i-1] (the EOS that
    ends t's document, at t+i itself, stays a target)."""
    targets = []
    if document_end_id is not None:
        ends = F.pad(torch.cumsum(tokens == document_end_id, dim=1), (1, 0))  # ends[:, k] = #EOS in tokens[:, :k]
    for i in range(1, n_future + 1):
        t = torch.full((tokens.shape[0], seq_len), IGNORE_INDEX, dtype=torch.long, device=tokens.device)
        avail = max(0, min(seq_len, tokens.shape[1] - i))
        t[:, :avail] = tokens[:, i:i + avail]
        if pad_id is not None:
            t[t == pad_id] = IGNORE_INDEX
        if document_end_id is not None:
            crosses = ends[:, i:i + avail] > ends[:, :avail]
            t[:, :avail][crosses] = IGNORE_INDEX
        targets.append(t)
    return targets


def _setup(model, tokens, seq_len, weights, pad_id, document_end_id=None, denominators=None, targets=None):
    n = model.n_future
    T = tokens.shape[1] - 1 if seq_len is None else seq_len
    if T < 1 or T > tokens.shape[1]:
        raise ValueError(f"seq_len={T} must be in [1, {tokens.shape[1]}] for a batch of {tokens.shape[1]} tokens")
    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n:
        raise ValueError(f"loss.head_weights has {len(weights)} entries, model.n_future is {n}")
    if targets is None:
        targets = head_targets(tokens, T, n, pad_id, document_end_id)
    elif len(targets) != n or any(tuple(t.shape) != (tokens.shape[0], T) for t in targets):
        raise ValueError(f"targets must be model.n_future={n} tensors of shape [{tokens.shape[0]}, {T}] "
                         f"(head_targets of these tokens), got shapes {[tuple(t.shape) for t in targets]}")
    counts = [int((t != IGNORE_INDEX).sum()) for t in targets]
    documents = None if document_end_id is None else PackedDocuments.from_tokens(tokens[:, :T], document_end_id)
    # Each head's summed cross-entropy is divided by this micro-batch's valid targets, or by the
    # caller's denominators: with document masking the count varies between micro-batches and
    # ranks, and the trainer passes the step's mean count so every target weighs the same.
    divisors = [max(c, 1) for c in counts] if denominators is None else list(denominators)
    if len(divisors) != n:
        raise ValueError(f"denominators has {len(divisors)} entries, model.n_future is {n}")
    return T, weights, targets, counts, documents, divisors


def head_sequential_loss(model: MTPTransformer, tokens: torch.Tensor, *, seq_len: Optional[int] = None,
                         weights: Optional[Sequence[float]] = None, chunk_size: int = 0,
                         pad_id: Optional[int] = None, loss_scale: float = 1.0,
                         hooks: Optional[GradSyncHooks] = None, document_end_id: Optional[int] = None,
                         denominators: Optional[Sequence[float]] = None,
                         trunk_output: Optional[torch.Tensor] = None,
                         targets: Optional[Sequence[torch.Tensor]] = None) -> MTPLoss:
    """Forward and backward of the multi-token loss with one head's logits alive at a time.

    tokens [B, L]: inputs are tokens[:, :seq_len] (default L - 1); gradients of
    ``loss_scale * sum_i w_i * mean CE_i`` are accumulated into the parameters' ``.grad``.
    ``document_end_id``: windows are packed documents ended by this id; attention, positions and
    targets stay inside each document.
    ``trunk_output``: z computed elsewhere (a pipeline's last stage): the trunk is neither run nor
    backpropagated here; ``MTPLoss.trunk_loss`` is ``(z * g).sum()`` for the heads' accumulated
    gradient g, whose backward gives z exactly that gradient.
    ``targets``: ``head_targets`` of these tokens when the caller has built them already (the
    trainer does, to count a step's targets before its first micro-batch); built here when None.
    """
    hooks = hooks or GradSyncHooks()
    T, weights, targets, counts, documents, divisors = _setup(model, tokens, seq_len, weights, pad_id,
                                                              document_end_id, denominators, targets)
    n = model.n_future
    run, last = _heads_to_run(weights, model.heads_chain)
    z = model.trunk_forward(tokens[:, :T], documents=documents) if trunk_output is None else trunk_output
    # A frozen trunk (train.freeze=trunk) yields z without a graph: then nothing backprops into it.
    z_leaf = z.detach().requires_grad_(z.requires_grad)
    per_head = []
    chained = []  # causal heads: (state, leaf of state) kept for the reverse pass below
    x = z_leaf
    for i in range(1, n + 1):
        if not run[i - 1]:
            per_head.append(_SKIPPED.to(z.device))
            continue
        h, y = model.head_forward(i, x, shifted_tokens(tokens, i, T), documents=documents)
        if model.heads_chain:
            # Later heads read this state: cut the graph here, backprop the unembedding now
            # (frees the logits), and backprop the head itself once the later heads are done.
            y_leaf = y.detach().requires_grad_(y.requires_grad)
            loss_i = model.unembed(y_leaf, targets[i - 1], chunk_size=chunk_size) / divisors[i - 1]
            hooks.before_head_backward(i, last=i == last)
            if loss_i.requires_grad:
                (loss_i * (weights[i - 1] * loss_scale)).backward()
            x = h.detach().requires_grad_(h.requires_grad)
            chained.append((i, h, y, y_leaf, x))
        else:
            loss_i = model.unembed(y, targets[i - 1], chunk_size=chunk_size) / divisors[i - 1]
            hooks.before_head_backward(i, last=i == last)
            if loss_i.requires_grad:
                (loss_i * (weights[i - 1] * loss_scale)).backward()
        per_head.append(loss_i.detach())
        del h, y, loss_i
    # Causal heads, last to first: each backward also fills the leaf of the previous head's state.
    for i, h, y, y_leaf, h_leaf in reversed(chained):
        pairs = [(y, y_leaf.grad), (h, h_leaf.grad)]
        pairs = [(out, g) for out, g in pairs if g is not None and out.requires_grad]
        if pairs:
            hooks.before_chained_head_backward(i)
            torch.autograd.backward(*zip(*pairs))
    hooks.before_trunk_backward()
    has_grad = z.requires_grad and z_leaf.grad is not None
    if trunk_output is not None:
        # Zero when no head sent z a gradient; still a function of z so the caller's backward runs.
        # (with a DTensor z, of the local parts: its backward hands each rank's part its gradient)
        zl = z.to_local() if hasattr(z, "to_local") else z
        g = z_leaf.grad.to_local() if has_grad and hasattr(z_leaf.grad, "to_local") else z_leaf.grad
        trunk_loss = (zl * g).sum() if has_grad else (zl * 0).sum()
        return _result(per_head, weights, counts, trunk_loss)
    if has_grad:
        z.backward(z_leaf.grad)
    return _result(per_head, weights, counts)


def naive_loss(model: MTPTransformer, tokens: torch.Tensor, *, seq_len: Optional[int] = None,
               weights: Optional[Sequence[float]] = None, chunk_size: int = 0,
               pad_id: Optional[int] = None, loss_scale: float = 1.0,
               hooks: Optional[GradSyncHooks] = None, document_end_id: Optional[int] = None,
               denominators: Optional[Sequence[float]] = None,
               trunk_output: Optional[torch.Tensor] = None,
               targets: Optional[Sequence[torch.Tensor]] = None) -> MTPLoss:
    """The reference: all heads forward, the weighted sum of their losses, one backward.
    With ``trunk_output`` that backward is left to the caller: ``MTPLoss.trunk_loss`` is the
    scaled sum, still holding every head's graph."""
    hooks = hooks or GradSyncHooks()
    T, weights, targets, counts, documents, divisors = _setup(model, tokens, seq_len, weights, pad_id,
                                                              document_end_id, denominators, targets)
    run, last = _heads_to_run(weights, model.heads_chain)
    z = model.trunk_forward(tokens[:, :T], documents=documents) if trunk_output is None else trunk_output
    x, per_head = z, []
    for i in range(1, model.n_future + 1):
        if not run[i - 1]:  # no forward, so no gradient (not even zeros) for its parameters
            per_head.append(_SKIPPED.to(z.device))
            continue
        h, y = model.head_forward(i, x if model.heads_chain else z, shifted_tokens(tokens, i, T), documents=documents)
        per_head.append(model.unembed(y, targets[i - 1], chunk_size=chunk_size) / divisors[i - 1])
        x = h
    total = sum(w * l for w, l, r in zip(weights, per_head, run) if r)
    hooks.before_head_backward(last, last=True)
    hooks.before_trunk_backward()
    if trunk_output is not None:
        return _result([l.detach() for l in per_head], weights, counts, total * loss_scale)
    if total.requires_grad:
        (total * loss_scale).backward()
    return _result([l.detach() for l in per_head], weights, counts)


@torch.no_grad()
def evaluate_loss(model: MTPTransformer, tokens: torch.Tensor, *, seq_len: Optional[int] = None,
                  chunk_size: int = 0, pad_id: Optional[int] = None,
                  document_end_id: Optional[int] = None,
                  trunk_output: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], list[int]]:
    """Per-head summed cross-entropy and target counts, no gradients (validation).
    ``trunk_output``: z computed elsewhere (a pipeline's last stage)."""
    T, _, targets, counts, documents, _ = _setup(model, tokens, seq_len, None, pad_id, document_end_id)
    z = model.trunk_forward(tokens[:, :T], documents=documents) if trunk_output is None else trunk_output
    x, sums = z, []
    for i in range(1, model.n_future + 1):
        h, y = model.head_forward(i, x if model.heads_chain else z, shifted_tokens(tokens, i, T), documents=documents)
        sums.append(model.unembed(y, targets[i - 1], chunk_size=chunk_size))
        x = h
    return sums, counts


LOSS_IMPLS = {"head_sequential": head_sequential_loss, "naive": naive_loss}


def mtp_loss(impl: str, model: MTPTransformer, tokens: torch.Tensor, **kwargs) -> MTPLoss:
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss.impl must be one of {sorted(LOSS_IMPLS)}, got {impl!r}")
    return LOSS_IMPLS[impl](model, tokens, **kwargs)


# The per-head loss reported for a head that was skipped (weight 0): not computed.
_SKIPPED = torch.tensor(float("nan"))


def _heads_to_run(weights: Sequence[float], chain: bool) -> tuple[list[bool], int]:
    """Which heads run (forward and backward), and the last one that does. A head at weight 0
    is skipped; a chained (causal) head only if every later head is at weight 0 too, since
    those read its state."""
    run = [w != 0 for w in weights]
    if chain:
        run = [any(run[i:]) for i in range(len(run))]
    if not any(run):
        raise ValueError(f"every head has weight 0 ({list(weights)}): nothing to train")
    return run, max(i for i, r in enumerate(run, 1) if r)


def _result(per_head, weights, counts, trunk_loss=None) -> MTPLoss:
    total = sum(w * l for w, l in zip(weights, per_head) if w != 0)
    return MTPLoss(loss=total.detach(), per_head=per_head, n_targets=counts, trunk_loss=trunk_loss)
