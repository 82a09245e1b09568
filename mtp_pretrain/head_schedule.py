"""Per-head loss weights as a function of training progress: weight schedules and a curriculum on n.

The weights of optimizer step ``s`` are a pure function of ``s`` and of the tokens seen before
it; both are restored from checkpoints, so a resumed run uses exactly the weights the
uninterrupted run would have used (nothing else is stored).

* Schedule (``loss.weight_schedule``): a ``from`` vector and a ``to`` vector, each either given
  explicitly (one weight per head) or built from a preset shape for the extra heads relative to
  head 1 -- ``uniform`` (1), ``harmonic`` (1/i), ``exponential`` (gamma^(i-1)) -- times a scale
  (DeepSeek-V3's 0.3 -> 0.1 is ``uniform`` with ``from_scale=0.3, to_scale=0.1``). ``kind``:
  ``constant`` (the ``from`` vector throughout), ``step`` (``to`` from ``begin`` on), ``linear`` /
  ``cosine`` (anneal from ``from`` at ``begin`` to ``to`` at ``end``), counted in optimizer
  steps or tokens seen (``unit``).
* Curriculum (``loss.curriculum``): multiplies those weights by 0 for heads that are off.
  ``forward`` starts with head 1 alone and turns head k+1 on at ``curriculum_steps[k-1]``;
  ``reverse`` starts with every head and turns the last one still on off at each boundary, until
  only head 1 trains. A head at weight 0 costs nothing: the losses skip its forward and backward.
"""

from __future__ import annotations

import math
from typing import Optional

from mtp_pretrain.config import WEIGHT_PRESETS, LossConfig


def preset_weights(preset: str, n_future: int, scale: float = 1.0, gamma: float = 0.5) -> list[float]:
    """Head 1 weighs 1; head i > 1 weighs ``scale`` times the preset's shape at i."""
    shape = {"uniform": lambda i: 1.0, "harmonic": lambda i: 1.0 / i, "exponential": lambda i: gamma ** (i - 1)}
    if preset not in shape:
        raise ValueError(f"loss.weight_schedule.preset must be one of {WEIGHT_PRESETS}, got {preset!r}")
    return [1.0] + [scale * shape[preset](i) for i in range(2, n_future + 1)]


def default_curriculum_steps(n_future: int, max_steps: int) -> list[int]:
    """n - 1 boundaries spread evenly over the run: each head count trains for max_steps / n."""
    return [round(k * max_steps / n_future) for k in range(1, n_future)]


class HeadWeights:
    """``weights(step, tokens_seen)``: the per-head loss weights of optimizer step ``step``
    (0-based), ``tokens_seen`` being the tokens trained on before that step."""

    def __init__(self, cfg: LossConfig, n_future: int, max_steps: int):
        s = cfg.weight_schedule
        self.n, self.kind, self.unit, self.begin, self.end = n_future, s.kind, s.unit, s.begin, s.end
        if cfg.head_weights is not None:  # the constant vector of loss.head_weights
            self.start = self.stop = [float(w) for w in cfg.head_weights]
        else:
            self.start = ([float(w) for w in s.from_weights] if s.from_weights is not None
                          else preset_weights(s.preset, n_future, s.from_scale, s.gamma))
            self.stop = ([float(w) for w in s.to_weights] if s.to_weights is not None
                         else preset_weights(s.preset, n_future, s.to_scale, s.gamma))
        self.curriculum = cfg.curriculum
        self.boundaries: Optional[list[int]] = None
        if cfg.curriculum != "none":
            self.boundaries = list(cfg.curriculum_steps or default_curriculum_steps(n_future, max_steps))

    def progress(self, step: int, tokens_seen: int) -> float:
        """Fraction of the way from the ``from`` vector to the ``to`` vector, in [0, 1]."""
        x = step if self.unit == "step" else tokens_seen
        if self.kind == "constant":
            return 0.0
        if self.kind == "step" or self.end <= self.begin:
            return 1.0 if x >= self.begin else 0.0
        frac = min(1.0, max(0.0, (x - self.begin) / (self.end - self.begin)))
        return frac if self.kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * frac))

    def active(self, step: int) -> list[bool]:
        """Which heads the curriculum has on at ``step`` (all of them without a curriculum)."""
        if self.boundaries is None:
            return [True] * self.n
        passed = sum(step >= b for b in self.boundaries)  # boundaries crossed so far
        on = 1 + passed if self.curriculum == "forward" else self.n - passed
        return [i < on for i in range(self.n)]

    def weights(self, step: int, tokens_seen: int) -> list[float]:
        p = self.progress(step, tokens_seen)
        return [(a + (b - a) * p) if on else 0.0
                for a, b, on in zip(self.start, self.stop, self.active(step))]
