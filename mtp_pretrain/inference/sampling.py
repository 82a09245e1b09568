"""Token selection: greedy argmax, temperature / top-p sampling, and the acceptance rules that
make speculative decoding reproduce them exactly.

Greedy: a draft is accepted iff it equals the verifier's argmax; the first mismatch is replaced
by that argmax. The output is then the greedy output, whatever the drafts were.

Sampling (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023): draft ``d`` was
drawn from the draft distribution ``q`` (head i's filtered softmax), the verifier gives ``p``
(head 1's filtered softmax at the same position, conditioned on the accepted prefix). Accept
with probability ``min(1, p(d) / q(d))``; on rejection draw from ``max(0, p - q)``
renormalised. Each emitted token is then distributed exactly as ``p`` (the proof only needs
``q`` to be fixed before the verifier's randomness is drawn, which holds for MTP heads: head i's
distribution depends on the accepted context, and for causal heads on earlier drafts, never on
the verification). So speculative sampling samples from the same distribution as plain
sampling, though not the same random sequence.
"""

from __future__ import annotations

from typing import Optional

import torch


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the smallest set of tokens whose mass
    reaches ``top_p`` (nucleus), renormalised. Float32 whatever the logits' dtype."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row of probs [..., V] -> [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def leading_true(accept: torch.Tensor) -> torch.Tensor:
    """Length of the all-True prefix of each row of accept [B, K] -> [B]."""
    return accept.long().cumprod(dim=-1).sum(dim=-1)


def speculative_accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                       generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection-sample a chain of K drafts.

    p [B, K+1, V]: verifier distributions for the token after input j (input 0 = the last
    accepted token, input j = draft j); q [B, K, V]: the distribution each draft was drawn
    from; drafts [B, K]. Returns (n_accepted [B], next token [B]): the next token is drawn
    from the residual at the first rejection, or from p[:, K] when all drafts were accepted.
    """
    B, K = drafts.shape
    if K == 0:
        return torch.zeros(B, dtype=torch.long, device=p.device), sample(p[:, 0], generator)
    p_d = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, K, generator=generator, device=p.device)
    n_acc = leading_true(u * q_d < p_d)  # u < p/q without dividing by a tiny q
    rows = torch.arange(B, device=p.device)
    p_k = p[rows, n_acc]  # [B, V]
    residual = (p_k - q[rows, n_acc.clamp(max=K - 1)]).clamp_min(0.0)
    rejected = n_acc < K
    # A rejection has probability 0 where p == q, so an empty residual can only be rounding.
    usable = residual.sum(-1, keepdim=True) > 0
    nxt_dist = torch.where(rejected[:, None] & usable, residual, p_k)
    return n_acc, sample(nxt_dist / nxt_dist.sum(-1, keepdim=True), generator)
