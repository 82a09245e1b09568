"""Adaptive draft length (``num_drafts="auto"``): feed the number of drafts that pays.

A self-speculative pass that feeds k drafts (k = 0 is a plain greedy pass) costs C(k) seconds
and brings E(k) = 1 + a_1 + ... + a_k tokens per sequence, a_j being the probability that the
accepted prefix reaches draft position j. Speculation pays only where E(k) / C(k) beats
E(0) / C(0) = 1 / C(0), and how much it pays depends on the machine (on a compute-bound CPU
every fed token and unembedding row costs nearly its full share; on a GPU at small batch a pass
costs about the same whatever k) and on the text (repetitive code accepts far more than prose).
So the decoder measures both, online and per batch, and before every drafting step picks

    k* = argmax_k  E(k) / C(k)                      (one sequence)
    k* = argmin_k  C(k) * max_b R_b / E_b(k)        (a batch)

A batch runs until its last sequence is done, and on a CPU (as on a GPU) a pass over fewer rows
is not proportionally cheaper, so what counts is the estimated time to finish the batch at k:
the pass cost times the passes its slowest sequence still needs (R_b tokens left at E_b(k) per
pass). Maximising the batch's mean tokens per pass instead feeds long drafts for the sake of the
sequences that accept them while the one that does not pays for them in every pass.

* **Costs.** C(k) = verify(k) + draft(k): the wall time of the verification part of a pass
  that fed k drafts (trunk and head 1 over k+1 tokens, their unembedding, the acceptance
  decision) plus that of drafting k tokens for the next pass (k drafting heads over the accepted
  positions, their unembedding) and the step's bookkeeping. Each is the lower quartile of the
  last few samples *at the current batch size* (finished sequences leave the batch and make
  every pass cheaper; on a shared machine other work only ever adds time, so a low quantile
  ignores the passes it preempted); a k not yet timed at this
  batch size takes its time at another batch size, rescaled by the two sizes' ratio on a k
  timed at both. A drafting step that had to catch up positions of heads skipped earlier is not
  a sample (it is a switching cost, not the steady price of k). A k next to the one in use that
  was not timed for ``refresh_interval`` passes (4x that for the others) is timed again, so that
  the times of the k not in use follow the machine's speed instead of keeping one unlucky sample.
* **Acceptance.** Conditional acceptance c_j = P(draft j accepted | draft j-1 accepted), from
  decayed counts of the passes that fed position j (decay per pass, so acceptance is re-learned
  as the text changes: indentation vs a new identifier), shrunk with a small pseudo-count
  towards a prior: the acceptance the decoder's previous batch ended with (texts of one job
  resemble each other), raised by as much as this batch's c_{j-1} exceeds the previous one's,
  else c_{j-1} (1 for j = 1); a_j = c_1 ... c_j. Per sequence the same counts are kept
  and shrunk towards the batch's estimate (a sequence just started, or rarely fed, behaves like
  the batch). Positions not fed recently therefore
  drift back to an optimistic guess, which is what makes the decoder probe a longer draft now
  and then (one pass, which refreshes the estimate) instead of never learning that the text
  became predictable. Exactness does not depend on any of this: verification is unchanged.
* **Warm-up.** Until every k has ``min_samples`` verification and drafting times, the decoder
  feeds the largest k still missing one (the first passes feed all heads, which also measures the
  acceptance of every position), so a run tries each k once and then settles. Costs are a
  property of the machine and the model, so a :class:`~mtp_pretrain.inference.decode.Decoder`
  keeps its timings across ``generate`` calls (``measured``) and only its first batch warms up;
  acceptance is a property of the text and starts afresh with every batch.

``cost_model`` (a test hook and a way to plan for other hardware) replaces the measured costs:
``cost_model(k, batch_size)`` returns C(k) in any unit.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

CostModel = Callable[[int, int], float]


class DraftLengthController:
    def __init__(self, max_drafts: int, cost_model: Optional[CostModel] = None, acceptance_decay: float = 0.95,
                 prior_weight: float = 0.5, cost_samples: int = 9, min_samples: int = 2, refresh_interval: int = 100,
                 measured: Optional[dict] = None, acceptance_prior: Optional[Sequence[float]] = None):
        if max_drafts < 1:
            raise ValueError(f"max_drafts must be >= 1, got {max_drafts}")
        if (not 0 < acceptance_decay <= 1 or prior_weight <= 0 or not 1 <= min_samples <= cost_samples
                or refresh_interval < 1):
            raise ValueError("need 0 < acceptance_decay <= 1, prior_weight > 0, 1 <= min_samples <= cost_samples "
                             "and refresh_interval >= 1")
        self.max_drafts = max_drafts
        self.cost_model = cost_model
        self.acceptance_prior = list(acceptance_prior) if acceptance_prior is not None else None
        self.decay, self.prior_weight = acceptance_decay, prior_weight
        self.cost_samples, self.min_samples, self.refresh_interval = cost_samples, min_samples, refresh_interval
        self._last_choice: Optional[int] = None
        # Decayed counts per draft position j = 1..K (index j-1): sequences whose accepted
        # prefix reached j-1 in a pass that fed j, and those among them that accepted j.
        self.reached = [0.0] * max_drafts
        self.accepted = [0.0] * max_drafts
        self._per_row: dict[int, tuple[list[float], list[float]]] = {}  # row -> (reached, accepted)
        self.row_prior_weight = 2.0  # pseudo-passes of the batch estimate in a row's estimate
        # Shared with earlier runs when given: "passes" (verification passes timed so far), per
        # phase "timed" (the pass at which each k was last timed) and "count" (samples taken),
        # and per batch size, per phase, the last samples per k (seconds).
        self._measured = {} if measured is None else measured
        self._measured.setdefault("passes", 0)
        self._measured.setdefault("timed", {p: [None] * (max_drafts + 1) for p in ("verify", "draft")})
        self._measured.setdefault("count", {p: [0] * (max_drafts + 1) for p in ("verify", "draft")})
        self._costs: dict[int, dict[str, list[list[float]]]] = self._measured.setdefault("by_batch_size", {})

    # -- observations ---------------------------------------------------------------------------

    def record_verification(self, k: int, batch_size: int, seconds: float, n_accepted: Sequence[int],
                            rows: Optional[Sequence[int]] = None) -> None:
        """A pass fed k drafts to ``batch_size`` sequences (ids ``rows``), took ``seconds`` up to
        the acceptance decision and accepted ``n_accepted`` drafts per sequence."""
        for row, n in zip(rows or (), n_accepted):
            reached, accepted = self._per_row.setdefault(row, ([0.0] * self.max_drafts, [0.0] * self.max_drafts))
            for j in range(self.max_drafts):
                reached[j] = reached[j] * self.decay + (j < k and j <= n)
                accepted[j] = accepted[j] * self.decay + (j < k and j < n)
        self.reached = [r * self.decay for r in self.reached]
        self.accepted = [a * self.decay for a in self.accepted]
        at_least = [0] * (k + 2)  # at_least[j]: sequences that accepted j drafts or more
        for n in n_accepted:
            at_least[n] += 1
        for j in range(k - 1, -1, -1):
            at_least[j] += at_least[j + 1]
        for j in range(k):  # position j+1 was reached by those that accepted j, accepted by those past it
            self.reached[j] += at_least[j]
            self.accepted[j] += at_least[j + 1]
        self._measured["passes"] += 1
        self._record(batch_size, "verify", k, seconds)

    def record_drafting(self, k: int, batch_size: int, seconds: float) -> None:
        """Drafting k tokens for the next pass (and the step's bookkeeping) took ``seconds``."""
        self._record(batch_size, "draft", k, seconds)

    def _record(self, batch_size: int, phase: str, k: int, seconds: float) -> None:
        table = self._costs.setdefault(batch_size, {p: [[] for _ in range(self.max_drafts + 1)]
                                                    for p in ("verify", "draft")})
        samples = table[phase][k]
        samples.append(seconds)
        del samples[: -self.cost_samples]
        self._measured["timed"][phase][k] = self._measured["passes"]
        self._measured["count"][phase][k] += 1

    def _estimate(self, batch_size: int, phase: str, k: int) -> Optional[float]:
        samples = self._costs[batch_size][phase][k] if batch_size in self._costs else []
        return sorted(samples)[len(samples) // 4] if samples else None

    # -- estimates and the decision -------------------------------------------------------------

    def conditional_acceptance(self) -> list[float]:
        """c_j for j = 1..K, shrunk towards c_{j-1} (1 for j = 1) by ``prior_weight`` pseudo-passes."""
        out, prev, shift = [], 1.0, 0.0
        for j, (r, a) in enumerate(zip(self.reached, self.accepted)):
            prior = prev
            if self.acceptance_prior is not None:
                # The previous batch's acceptance, raised by as much as this batch accepts more
                # at the position before: a text that turned predictable gets longer drafts tried.
                prior = min(1.0, self.acceptance_prior[j] + max(shift, 0.0))
            prev = (a + self.prior_weight * prior) / (r + self.prior_weight)
            if self.acceptance_prior is not None:
                shift = prev - self.acceptance_prior[j]
            out.append(prev)
        return out

    def expected_tokens(self, row: Optional[int] = None) -> list[float]:
        """E(k) for k = 0..K: tokens a sequence (the batch's typical one, or ``row``) gets from a
        pass that feeds k drafts."""
        cond = self.conditional_acceptance()
        if row is not None and row in self._per_row:
            w = self.row_prior_weight
            cond = [(a + w * c) / (r + w) for r, a, c in zip(*self._per_row[row], cond)]
        out, reach = [1.0], 1.0
        for c in cond:
            reach *= c
            out.append(out[-1] + reach)
        return out

    def costs(self, batch_size: int) -> list[Optional[float]]:
        """C(k) for k = 0..K at this batch size (None: not measured yet)."""
        if self.cost_model is not None:
            return [float(self.cost_model(k, batch_size)) for k in range(self.max_drafts + 1)]
        return [self._cost(batch_size, k) for k in range(self.max_drafts + 1)]

    def _cost(self, batch_size: int, k: int) -> Optional[float]:
        total = 0.0
        for phase in ("verify", "draft"):
            mine = self._estimate(batch_size, phase, k)
            if mine is not None:
                total += mine
                continue
            # Not timed at this batch size: another size's time (the nearest first), rescaled
            # by the two sizes' ratio of verification times on a k timed at both.
            for other in sorted(self._costs, key=lambda b: abs(b - batch_size)):
                theirs = self._estimate(other, phase, k) if other != batch_size else None
                if theirs is not None:
                    total += theirs * self._scale(batch_size, other)
                    break
            else:
                return None
        return total

    def _scale(self, batch_size: int, other: int) -> float:
        for j in range(self.max_drafts + 1):
            mine, theirs = self._estimate(batch_size, "verify", j), self._estimate(other, "verify", j)
            if mine is not None and theirs:
                return mine / theirs
        return 1.0

    def choose(self, batch_size: int, rows: Optional[Sequence[int]] = None,
               remaining: Optional[Sequence[int]] = None) -> int:
        """The number of drafts to propose for the next pass; ``rows`` (ids of the active
        sequences) with ``remaining`` (tokens each may still generate) minimise the batch's
        estimated time to finish, else the tokens per second of a typical sequence."""
        self._last_choice = k = self._choose(batch_size, rows, remaining)
        return k

    def _choose(self, batch_size: int, rows, remaining) -> int:
        costs = self.costs(batch_size)
        if self.cost_model is None:
            count, timed, passes = self._measured["count"], self._measured["timed"], self._measured["passes"]
            missing = [k for k in range(self.max_drafts + 1)
                       if costs[k] is None or min(count["verify"][k], count["draft"][k]) < self.min_samples]
            if missing:
                return missing[-1]
            last = self._last_choice

            def stale(k: int) -> bool:
                age = passes - min(timed["verify"][k], timed["draft"][k])
                near = last is None or abs(k - last) <= 1
                return age >= self.refresh_interval * (1 if near else 4)

            if last is not None and stale(last):  # switched to it to time it, but its drafting was a catch-up
                return last
            refresh = [k for k in range(self.max_drafts + 1) if stale(k)]
            if refresh:
                return refresh[-1]
        ks = range(self.max_drafts + 1)
        if rows is None:
            gains = self.expected_tokens()
            rates = [gains[k] / max(costs[k], 1e-12) for k in ks]
            return max(ks, key=lambda k: (rates[k], -k))  # ties: the shorter draft
        passes = [0.0] * (self.max_drafts + 1)  # passes the slowest sequence needs at each k
        for row, left in zip(rows, remaining if remaining is not None else [1] * len(rows)):
            gains = self.expected_tokens(row)
            passes = [max(p, left / g) for p, g in zip(passes, gains)]
        return min(ks, key=lambda k: (costs[k] * passes[k], k))
