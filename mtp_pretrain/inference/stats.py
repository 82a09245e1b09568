"""Per-sequence and per-run decoding statistics.

Counting conventions (the same for every mode, so that the numbers compare):

* a *forward pass* is one call of trunk + verifying head over the batch (the prompt pass
  included); causal heads' sequential drafting passes are counted separately (``head_passes``);
* a sequence's ``forward_passes`` counts the passes it took part in, so its
  ``accepted_per_forward`` = generated tokens / its passes is 1.0 for greedy decoding and up to
  n for self-speculative decoding with n heads;
* draft position j (j = 1 .. n-1: the token j+1 steps after the last accepted one, proposed by
  head j+1, or by the depth-j level of a tree) is *accepted* in a step when the accepted prefix
  reaches it. ``acceptance_rate`` per position = accepted / proposed (unconditional: a draft
  behind a rejected one counts as not accepted), counted over the passes that fed position j;
* ``draft_lengths``: the drafts fed in each verification pass of the run (fixed, or chosen per
  pass by ``num_drafts="auto"``; 0 = a greedy pass); ``probe_passes``: how many of them
  ``auto`` fed to measure (warm-up, re-timing, checking a longer draft) rather than because
  it expected them to pay.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SequenceStats:
    forward_passes: int = 0
    tokens_generated: int = 0
    drafts_proposed: list[int] = field(default_factory=list)
    drafts_accepted: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "eos" or "length"

    @property
    def accepted_per_forward(self) -> float:
        return self.tokens_generated / max(self.forward_passes, 1)

    def to_dict(self) -> dict:
        return {
            "forward_passes": self.forward_passes,
            "tokens_generated": self.tokens_generated,
            "accepted_per_forward": round(self.accepted_per_forward, 4),
            "acceptance_rate_per_position": _rates(self.drafts_accepted, self.drafts_proposed),
            "finish_reason": self.finish_reason,
        }


@dataclass
class RunStats:
    mode: str
    batch_size: int
    forward_passes: int = 0  # batched trunk + verifier calls
    head_passes: int = 0  # extra sequential drafting passes (causal heads only)
    wall_time_s: float = 0.0
    sequences: list[SequenceStats] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)  # drafts fed per verification pass
    probe_passes: int = 0  # num_drafts="auto": passes fed to measure rather than because they pay

    @property
    def tokens_generated(self) -> int:
        return sum(s.tokens_generated for s in self.sequences)

    @property
    def sequence_forward_passes(self) -> int:
        return sum(s.forward_passes for s in self.sequences)

    @property
    def accepted_per_forward(self) -> float:
        return self.tokens_generated / max(self.sequence_forward_passes, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def acceptance_rate_per_position(self) -> list[float]:
        width = max((len(s.drafts_proposed) for s in self.sequences), default=0)
        proposed, accepted = [0] * width, [0] * width
        for s in self.sequences:
            for j, (p, a) in enumerate(zip(s.drafts_proposed, s.drafts_accepted)):
                proposed[j] += p
                accepted[j] += a
        return _rates(accepted, proposed)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "batch_size": self.batch_size,
            "forward_passes": self.forward_passes,
            "head_passes": self.head_passes,
            "tokens_generated": self.tokens_generated,
            "accepted_per_forward": round(self.accepted_per_forward, 4),
            "acceptance_rate_per_position": self.acceptance_rate_per_position(),
            "wall_time_s": round(self.wall_time_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "draft_lengths": list(self.draft_lengths),
            "probe_passes": self.probe_passes,
        }


def _rates(accepted: list[int], proposed: list[int]) -> list[float]:
    return [round(a / p, 4) if p else 0.0 for a, p in zip(accepted, proposed)]
