"""Watching the denoiser's loss for a jump that stays: a run that diverged without any NaN.

A diffusion loss is noisy step to step (every batch draws its own timesteps), so the watch compares
means over windows of steps: once the mean of ``patience`` windows in a row is above ``factor``
times the lowest window mean seen so far, the run has diverged. Seen here: ``+condition=text
trainer.steps=3200`` at lr 2e-3 jumped from 0.05 to 0.35 at step 610 and never came back, while
every value stayed finite (docs/reliability.md, "A loss that jumps").
"""

from __future__ import annotations

import math

from ldmcore.config import ConfigError


class DivergedLossError(FloatingPointError):
    """The denoiser's loss jumped and stayed up (``trainer.on_divergence=stop``); the message names
    the step, the loss before and after, and the last checkpoint."""


class DivergenceWatch:
    """Feed it every step's loss; it answers a message the step the loss is found diverged.

    factor: how many times the lowest window mean counts as diverged; window: steps per mean;
    patience: windows in a row above it. After a message the watch waits for the loss to come back
    below the line before it can report again (so ``warn`` warns once per episode).
    """

    def __init__(self, factor: float, window: int, patience: int):
        if factor <= 1 or window < 1 or patience < 1:
            raise ConfigError(f"trainer.divergence_factor must be > 1 and trainer.divergence_window, "
                             f"trainer.divergence_patience >= 1; got {factor}, {window}, {patience}")
        self.factor, self.window, self.patience = factor, window, patience
        self.total, self.count = 0.0, 0
        self.lowest: tuple[float, int] | None = None  # (window mean, its last step)
        self.above: list[tuple[float, int]] = []  # the windows in a row above the line
        self.reported = False

    def update(self, step: int, loss: float) -> str | None:
        if not math.isfinite(loss):  # non-finite steps are trainer.on_nonfinite's business
            return None
        self.total, self.count = self.total + loss, self.count + 1
        if self.count < self.window:
            return None
        mean, self.total, self.count = self.total / self.count, 0.0, 0
        if self.lowest is None or mean < self.lowest[0]:
            self.lowest = (mean, step)
        if mean <= self.factor * self.lowest[0]:
            self.above, self.reported = [], False
            return None
        self.above.append((mean, step))
        if len(self.above) < self.patience or self.reported:
            return None
        self.reported = True
        first = self.above[0][1] - self.window + 1  # the first step of the first window above the line
        return (f"the denoiser's loss diverged: its mean over {self.window} steps has stayed above "
                f"{self.factor:g} x its lowest ({self.lowest[0]:.4g}, steps to {self.lowest[1]}) since step {first}, "
                f"now {mean:.4g} at step {step}")
