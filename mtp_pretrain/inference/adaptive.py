"""Adaptive draft length (``num_drafts="auto"``): feed the number of drafts that pays.

A self-speculative pass that feeds k drafts (k = 0 is a plain greedy pass) costs C(k) seconds
and brings E(k) = 1 + a_1 + ... + a_k tokens per sequence, a_j being the probability that the
accepted prefix reaches draft position j. Speculation pays only where E(k) / C(k) beats
E(0) / C(0) = 1 / C(0), and how much it pays depends on the machine (on a compute-bound CPU
every fed token and unembedding row costs nearly its full share; on a GPU at small batch a pass
costs about the same whatever k) and on the text (repetitive code accepts far more than prose).
So the decoder measures both, online and per batch, and before every drafting step picks

    k* = argmax_k  E(k) / C(k)                      (one sequence)
    k* = argmin_k  S(k) + C(k) * max_b R_b / E_b(k)        (a batch; S: switching cost)

A batch runs until its last sequence is done, and on a CPU (as on a GPU) a pass over fewer rows
is not proportionally cheaper, so what counts is the estimated time to finish the batch at k:
the pass cost times the passes its slowest sequence still needs (R_b tokens left at E_b(k) per
pass), plus what switching to k costs once: drafting heads that did not run (skipped by
shorter drafts, or the prompt of a new batch) must first catch up on every position they
missed. Maximising the batch's mean tokens per pass instead feeds long drafts for the sake of the
sequences that accept them while the one that does not pays for them in every pass.

* **Costs.** C(k) = verify(k) + draft(k): the wall time of the verification part of a pass
  that fed k drafts (trunk and head 1 over k+1 tokens, their unembedding, the acceptance
  decision) plus that of drafting k tokens for the next pass (k drafting heads over the accepted
  positions, their unembedding) and the step's bookkeeping. Each is the lower quartile of the
  last ``cost_samples`` samples *at the current batch size* (finished sequences leave the batch
  and make every pass cheaper; on a shared machine other work only ever adds time, so a low
  quantile ignores the passes it preempted). The window is long (200 passes, about a second on
  a CPU) because the ks are compared with each other while only the fed one is timed: a short
  window made the fed k's cost follow a slow spell of the machine that the others' older
  samples never saw, and a greedy pass that other work slowed to 9 ms made a 1-draft pass
  timed at 8.6 ms look free. A k not yet timed at this batch size takes its time at
  another batch size, rescaled by the two sizes' ratio on a k timed at both; and C(k) is taken
  non-decreasing in k (a few lucky samples of a rarely fed k must not make it look cheaper than a
  shorter draft). A drafting step
  that had to catch up positions of heads skipped earlier is not a sample (it is a switching
  cost, not the steady price of k).
* **Acceptance.** Conditional acceptance c_j = P(draft j accepted | draft j-1 accepted), from
  counts of the passes that fed position j, decayed by ``acceptance_decay`` at every new
  observation of j (recent passes weigh more, so acceptance is re-learned as the text changes:
  indentation vs a new identifier), shrunk towards a prior: the acceptance of the decoder's
  last few batches that fed position j (texts of one job resemble each other; their passes
  pooled; ``carry_weight`` pseudo-passes; batches that fed nothing in between do not erase
  it), raised by as much as this batch's c_{j-1} exceeds theirs, else c_{j-1} (1 for j = 1;
  ``prior_weight`` pseudo-passes); a_j = c_1 ... c_j. Per sequence the same counts are kept and
  shrunk towards the batch's estimate (a sequence just started, or rarely fed, behaves like the
  batch). A position that is not fed keeps its estimate: the decision alone never tries a draft
  it expects to lose.
* **Probes, on a budget.** What is not fed is not measured, so the decoder must now and then
  feed a k it does not expect to win: to learn that the text became predictable (an optimistic
  estimate says a longer draft might now win: the best of the last batches' acceptance at the
  start of a batch -- one prompt's continuation repeats itself, the next one's does not -- and
  what was seen at position j fading by ``acceptance_decay`` per pass since j was last fed,
  back to c_{j-1}; one more draft than the decision's is fed, as waking a head costs its
  catch-up), or to re-time a k not
  timed for ``refresh_interval`` passes (the machine's speed drifts). Such a *probe* is paid
  from an allowance that grows by ``explore_share`` of every second spent decoding (capped at
  what ~200 passes earn). A probe is fed only when the allowance covers what it may lose: the
  extra cost of its pass plus the catch-up of the drafting heads it wakes (heads skipped by
  earlier passes must first run over every position they missed, a prompt included: measured
  per head and position, and the decoder says how many positions each k would catch up), the
  catch-up counted as lost only as likely as the new draft is rejected (the hoped acceptance). Then
  the probe is charged its regret: its seconds (catch-up included) minus the tokens it brought
  (in a batch, to the sequence that sets the batch's time) times the seconds per token the
  decision would have paid. Probes that lose cost at most
  ``explore_share`` of the decoding time; a probe that wins costs nothing and goes on until it
  loses, while the decision learns from what it sees. The budget is what keeps ``auto`` within a few percent of greedy
  decoding where no draft pays.
* **Warm-up.** Until every k has ``min_samples`` verification and drafting times, the decoder
  feeds the largest k still missing one (the first passes feed all heads, which also measures the
  acceptance of every position), so a run tries each k once and then settles (not charged: it
  happens once per decoder). Costs and the allowance are properties of the machine and the
  model, so a :class:`~mtp_pretrain.inference.decode.Decoder` keeps them across ``generate``
  calls (``measured``) and only its first batch warms up; acceptance is a property of the text
  and starts afresh with every batch.

``cost_model`` (a test hook and a way to plan for other hardware) replaces the measured costs:
``cost_model(k, batch_size)`` returns C(k) in any unit; nothing is timed and nothing probed.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

CostModel = Callable[[int, int], float]

PHASES = ("verify", "draft")


class DraftLengthController:
    def __init__(self, max_drafts: int, cost_model: Optional[CostModel] = None, acceptance_decay: float = 0.95,
                 prior_weight: float = 0.5, cost_samples: int = 200, min_samples: int = 2, refresh_interval: int = 200,
                 explore_share: float = 0.02, carry_weight: float = 8.0, hold_passes: int = 8,
                 measured: Optional[dict] = None,
                 history: Optional[Sequence[Sequence[tuple[int, int]]]] = None):
        if max_drafts < 1:
            raise ValueError(f"max_drafts must be >= 1, got {max_drafts}")
        if (not 0 < acceptance_decay <= 1 or prior_weight <= 0 or not 1 <= min_samples <= cost_samples
                or refresh_interval < 1 or not 0 <= explore_share < 1 or hold_passes < 1):
            raise ValueError("need 0 < acceptance_decay <= 1, prior_weight > 0, 1 <= min_samples <= cost_samples, "
                             "refresh_interval >= 1, 0 <= explore_share < 1 and hold_passes >= 1")
        self.max_drafts = max_drafts
        self.cost_model = cost_model
        self.decay, self.prior_weight = acceptance_decay, prior_weight
        self.cost_samples, self.min_samples, self.refresh_interval = cost_samples, min_samples, refresh_interval
        self.explore_share = explore_share
        # Decayed counts per draft position j = 1..K (index j-1): sequences whose accepted
        # prefix reached j-1 in a pass that fed j, and those among them that accepted j.
        self.reached = [0.0] * max_drafts
        self.accepted = [0.0] * max_drafts
        self.fed_at: list[Optional[int]] = [None] * max_drafts  # this batch's pass that last fed position j
        self.batch_passes = 0
        # Per position, the counts (reached, accepted) of the last batches that fed it, however
        # many batches fed nothing in between (they have nothing to say about it: without this
        # memory a run of greedy batches would reset the prior to the optimistic c_{j-1}, and the
        # next batch would start by feeding every head). Pooled, the prior of the position; their
        # best, what a probe at the start of a batch hopes for (texts of a job differ: one
        # prompt's continuation repeats itself, the next one's does not).
        self.history = [list(seen) for seen in history] if history else [[] for _ in range(max_drafts)]
        self.acceptance_prior: list[Optional[float]] = [None] * max_drafts
        self.hoped_prior: list[Optional[float]] = [None] * max_drafts
        for j, seen in enumerate(self.history):
            if seen:
                self.acceptance_prior[j] = sum(a for _, a in seen) / sum(r for r, _ in seen)
                self.hoped_prior[j] = max(a / r for r, a in seen)
        self.carry_weight = carry_weight
        self.batch_reached, self.batch_accepted = [0] * max_drafts, [0] * max_drafts
        self._per_row: dict[int, tuple[list[float], list[float]]] = {}  # row -> (reached, accepted)
        self.row_prior_weight = 4.0  # pseudo-passes of the batch estimate in a row's estimate
        # The pass in flight: its k, whether it is a probe (charged to the allowance) and then
        # the seconds per token the decision would have paid, and its seconds so far.
        self._in_flight: Optional[int] = None
        self._probe_rate: Optional[float] = None
        self._probe_seconds = 0.0
        self._timing_probe = False
        self._probe_won = False  # the last pass was a probe that brought more than the decision would have
        self._probe_row: Optional[int] = None
        self.probes = 0  # probe passes of this batch (warm-up not included)
        self.hold_passes = hold_passes
        self._decided: Optional[tuple[int, int]] = None  # (batch pass, batch size) of the last decision
        # Shared with earlier runs when given: "passes" (verification passes timed so far), per
        # phase "timed" (the pass at which each k was last timed) and "count" (samples taken),
        # "allowance" (seconds of probing the budget allows now), and per batch size, per
        # phase, the last samples per k (seconds).
        m = self._measured = {} if measured is None else measured
        m.setdefault("passes", 0)
        m.setdefault("allowance", 0.0)
        m.setdefault("catch_up", [])  # seconds per drafting head and position caught up (last samples)
        m.setdefault("timed", {p: [None] * (max_drafts + 1) for p in PHASES})
        m.setdefault("count", {p: [0] * (max_drafts + 1) for p in PHASES})
        self._costs: dict[int, dict[str, list[list[float]]]] = m.setdefault("by_batch_size", {})
        self._estimates: dict[tuple, Optional[float]] = {}

    # -- observations ---------------------------------------------------------------------------

    def record_verification(self, k: int, batch_size: int, seconds: float, n_accepted: Sequence[int],
                            rows: Optional[Sequence[int]] = None) -> None:
        """A pass fed k drafts to ``batch_size`` sequences (ids ``rows``), took ``seconds`` up to
        the acceptance decision and accepted ``n_accepted`` drafts per sequence."""
        d = self.decay
        if k:
            for row, n in zip(rows or (), n_accepted):
                reached, accepted = self._per_row.setdefault(row, ([0.0] * self.max_drafts,
                                                                   [0.0] * self.max_drafts))
                for j in range(min(k, n + 1)):  # positions fed and reached: j <= n
                    reached[j] = reached[j] * d + 1.0
                    accepted[j] = accepted[j] * d + (j < n)
            at_least = [0] * (k + 2)  # at_least[j]: sequences that accepted j drafts or more
            for n in n_accepted:
                at_least[n] += 1
            for j in range(k - 1, -1, -1):
                at_least[j] += at_least[j + 1]
            for j in range(k):  # position j+1 was reached by those that accepted j, accepted by those past it
                self.reached[j] = self.reached[j] * d + at_least[j]
                self.accepted[j] = self.accepted[j] * d + at_least[j + 1]
                self.batch_reached[j] += at_least[j]
                self.batch_accepted[j] += at_least[j + 1]
                self.fed_at[j] = self.batch_passes
        self.batch_passes += 1
        self._measured["passes"] += 1
        self._record(batch_size, "verify", k, seconds)
        self._spend(seconds)
        if self._probe_rate is not None and self._in_flight == k:
            if rows is not None and self._probe_row in rows:  # the sequence that sets the batch's time
                tokens = 1.0 + n_accepted[list(rows).index(self._probe_row)]
            else:
                tokens = 1.0 + sum(n_accepted) / max(len(n_accepted), 1)
            regret = self._probe_seconds + seconds - tokens * self._probe_rate
            self._measured["allowance"] -= max(regret, 0.0)
            self._probe_won = regret <= 0
        else:
            self._probe_won = False
        self._probe_rate, self._probe_seconds = None, 0.0

    def record_drafting(self, k: int, batch_size: int, seconds: float, catch_up: int = 0) -> None:
        """Drafting k tokens for the next pass (and the step's bookkeeping) took ``seconds``;
        ``catch_up``: head positions that heads skipped by earlier passes first ran over (then it
        is a sample of the catch-up's price, not of k's)."""
        if catch_up:
            samples = self._measured["catch_up"]
            samples.append(seconds / catch_up)
            del samples[: -self.cost_samples]
        else:
            self._record(batch_size, "draft", k, seconds)
        self._spend(seconds)
        if self._probe_rate is not None:
            self._probe_seconds += seconds

    def _spend(self, seconds: float) -> None:
        """Decoding time earns ``explore_share`` of itself as probing allowance (capped)."""
        cap = self.explore_share * 200 * seconds
        self._measured["allowance"] = min(self._measured["allowance"] + self.explore_share * seconds,
                                          max(cap, self._measured["allowance"]))

    def _record(self, batch_size: int, phase: str, k: int, seconds: float) -> None:
        table = self._costs.setdefault(batch_size, {p: [[] for _ in range(self.max_drafts + 1)] for p in PHASES})
        samples = table[phase][k]
        samples.append(seconds)
        self._estimates.pop((batch_size, phase, k), None)
        del samples[: -self.cost_samples]
        self._measured["timed"][phase][k] = self._measured["passes"]
        self._measured["count"][phase][k] += 1

    def _estimate(self, batch_size: int, phase: str, k: int) -> Optional[float]:
        key = (batch_size, phase, k)
        if key not in self._estimates:  # cached until the next sample: sorting every pass shows
            self._estimates[key] = _low(self._costs[batch_size][phase][k] if batch_size in self._costs else [])
        return self._estimates[key]

    # -- estimates and the decision -------------------------------------------------------------

    def conditional_acceptance(self, optimistic: bool = False, best: bool = True) -> list[float]:
        """c_j for j = 1..K. Shrunk towards the last batches' pooled c_j (``carry_weight``
        pseudo-passes), raised by as much as this batch's c_{j-1} exceeds theirs (a text that
        turned predictable gets longer drafts), or where they did not feed j towards c_{j-1} (1
        for j = 1; ``prior_weight`` pseudo-passes). ``optimistic`` (what a probe hopes for): the
        last batches' ``best`` c_j (else their pooled one) weighing ever less, and what was seen,
        fading by ``acceptance_decay`` per pass since, towards c_{j-1}."""
        out, prev, shift = [], 1.0, 0.0
        carried = self.acceptance_prior
        for j, (r, a) in enumerate(zip(self.reached, self.accepted)):
            prior, weight = prev, self.prior_weight
            if optimistic:
                fade = 0.0 if self.fed_at[j] is None else self.decay ** (self.batch_passes - 1 - self.fed_at[j])
                r, a = r * fade, a * fade
                hoped = (self.hoped_prior if best else carried)[j]
                if hoped is not None:
                    w = self.carry_weight * self.decay ** self.batch_passes
                    r, a = r + w, a + w * hoped
            elif carried[j] is not None:
                prior, weight = min(1.0, carried[j] + max(shift, 0.0)), self.carry_weight
            prev = (a + weight * prior) / (r + weight)
            shift = prev - carried[j] if carried[j] is not None else 0.0
            out.append(prev)
        return out

    def passed_on(self, batches: int = 4) -> list[list[tuple[int, int]]]:
        """The acceptance history the next batch starts from: per position, the counts of the
        last ``batches`` batches that fed it (this one included if it did)."""
        return [(seen + [(r, a)] if r else seen)[-batches:]
                for seen, r, a in zip(self.history, self.batch_reached, self.batch_accepted)]

    def expected_tokens(self, row: Optional[int] = None, cond: Optional[list[float]] = None) -> list[float]:
        """E(k) for k = 0..K: tokens a sequence (the batch's typical one, or ``row``) gets from a
        pass that feeds k drafts (``cond``: the batch's conditional acceptance to start from)."""
        cond = self.conditional_acceptance() if cond is None else cond
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
        out, floor = [], 0.0
        for k in range(self.max_drafts + 1):
            # A pass that feeds more drafts never costs less: a few lucky samples of a long draft
            # taken while the machine was idler must not make it look cheaper than a short one.
            cost = self._cost(batch_size, k)
            floor = max(floor, cost) if cost is not None else floor
            out.append(floor if cost is not None else None)
        return out

    def _cost(self, batch_size: int, k: int) -> Optional[float]:
        total = 0.0
        for phase in PHASES:
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
               remaining: Optional[Sequence[int]] = None, catch_up: Optional[Sequence[int]] = None) -> int:
        """The number of drafts to propose for the next pass; ``rows`` (ids of the active
        sequences) with ``remaining`` (tokens each may still generate) minimise the batch's
        estimated time to finish, else the tokens per second of a typical sequence.
        ``catch_up[k]``: head positions the drafting heads would first have to catch up to draft
        k (heads skipped by earlier passes, or a prompt): a one-time cost of switching to k."""
        costs = self.costs(batch_size)
        k, rate, timing = self._choose(costs, rows, remaining, catch_up)
        self._in_flight, self._probe_rate, self._timing_probe = k, rate, timing
        self._probe_seconds = 0.0
        self.probes += rate is not None
        self._decided = (self.batch_passes, batch_size)
        return k

    def held(self, batch_size: int) -> Optional[int]:
        """0 while the last decision, a greedy pass, still holds without deciding again (then the
        caller skips :meth:`choose` and what it needs); None when it must be taken again.

        A greedy pass observes no acceptance, and the rest of what the decision weighs moves only
        towards greedy as the run goes on (fewer tokens left to repay a switch, more positions
        for skipped heads to catch up), so re-deciding after every greedy pass would mostly spend
        time: Python run between a CPU pass's kernels costs several times its idle price (a
        decision measured 30 us alone, ~90 us inside decoding: 2-3 % of a 4 ms pass). It is
        taken again every ``hold_passes`` passes (new cost samples, the probes' allowance and
        fading hopes), when the batch shrinks, and after every pass that fed drafts; with a
        ``cost_model``, after every pass (it may say anything at any time)."""
        if self.cost_model is not None or self._in_flight != 0 or self._timing_probe or self._decided is None:
            return None
        at, size = self._decided
        return 0 if size == batch_size and self.batch_passes - at < self.hold_passes else None

    def _choose(self, costs, rows, remaining, catch_up) -> tuple[int, Optional[float], bool]:
        """(k, the seconds per token the decision would pay if k is a probe else None, whether
        k is fed to time it)."""
        if self.cost_model is not None:
            return self._best(costs, rows, remaining, self.conditional_acceptance()), None, False
        count, timed, passes = self._measured["count"], self._measured["timed"], self._measured["passes"]
        known = [c is not None and min(count["verify"][k], count["draft"][k]) >= self.min_samples
                 for k, c in enumerate(costs)]
        if not all(known):  # warm-up, once per decoder: neither gated nor charged
            return max(k for k, ok in enumerate(known) if not ok), None, True
        per_position = _low(self._measured["catch_up"])
        switch = [per_position * n for n in catch_up] if catch_up is not None and per_position else None
        cond = self.conditional_acceptance()
        k_best, slowest = self._best_and_bottleneck(costs, rows, remaining, cond, True, switch)
        # Seconds per token the decision pays: of the sequence that sets the batch's time.
        rate = costs[k_best] / (slowest[1] if slowest else self.expected_tokens(cond=cond)[k_best])
        self._probe_row = slowest[0] if slowest else None
        stale = [k for k in range(self.max_drafts + 1)
                 if passes - min(timed["verify"][k], timed["draft"][k]) >= self.refresh_interval]
        last = self._in_flight
        if self._timing_probe and last in stale and last != k_best:
            return last, rate, True  # its drafting was a catch-up, not a sample: once more
        if self._probe_won and last > k_best:
            return last, rate, False  # a probe that wins goes on (free) until it loses
        allowance = self._measured["allowance"]
        if allowance <= 0:
            return k_best, None, False
        # One head beyond the decision at most: waking a skipped head costs its catch-up over
        # the whole context, and a win raises the estimate of the positions after it anyway.
        # A batch's time is its slowest sequence's: its hope is the last batches' pooled
        # acceptance, not the best one sequence reached.
        hope = self.conditional_acceptance(optimistic=True, best=rows is None or len(rows) == 1)
        k_hope = min(max(self._best(costs, rows, remaining, hope, per_row=False, switch=switch), k_best), k_best + 1)
        timing = k_hope == k_best
        if timing:  # re-time only where no head must catch up (a hoped probe times the others)
            stale = [k for k in stale if k != k_best and not (switch and switch[k])]
            if not stale:
                return k_best, None, False
            k_hope = min(stale, key=lambda k: (abs(k - k_best), -k))  # the nearest, the longer first
        # What the probe may lose: its pass's extra cost, and waking the heads it skipped unless
        # the new draft is accepted (as hoped: then the heads go on drafting).
        risk = max(costs[k_hope] - costs[k_best], 0.0)
        if switch is not None:
            risk += switch[k_hope] * (1.0 if timing else 1.0 - hope[k_hope - 1])
        if risk > allowance:
            return k_best, None, False
        return k_hope, rate, timing

    def _best(self, costs, rows, remaining, cond: list[float], per_row: bool = True, switch=None) -> int:
        return self._best_and_bottleneck(costs, rows, remaining, cond, per_row, switch)[0]

    def _best_and_bottleneck(self, costs, rows, remaining, cond, per_row, switch
                             ) -> tuple[int, Optional[tuple[int, float]]]:
        """(k, (the sequence whose passes set the batch's time at k, its expected tokens at k))."""
        ks = range(self.max_drafts + 1)
        typical = self.expected_tokens(cond=cond)
        if rows is None:
            k = max(ks, key=lambda k: (typical[k] / max(costs[k], 1e-12), -k))  # ties: the shorter draft
            return k, None
        gains = {row: self.expected_tokens(row, cond) if per_row and row in self._per_row else typical
                 for row in rows}
        left = dict(zip(rows, remaining if remaining is not None else [1] * len(rows)))
        passes = [max(left[row] / gains[row][k] for row in rows) for k in ks]  # the slowest sequence's
        switch = switch or [0.0] * len(costs)
        k = min(ks, key=lambda k: (switch[k] + costs[k] * passes[k], k))
        slowest = max(rows, key=lambda row: left[row] / gains[row][k])
        return k, (slowest, gains[slowest][k])

def _low(samples: Sequence[float]) -> Optional[float]:
    """A low quantile of the samples: on a shared machine other work only ever adds time."""
    return sorted(samples)[len(samples) // 4] if samples else None
