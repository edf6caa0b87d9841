"""KL weight (beta) schedules used against posterior collapse."""
from __future__ import annotations


class KLWarmup:
    """beta as a function of the training step.

    ``"linear"`` (Bowman et al., 2016; Sønderby et al., 2016): beta rises linearly from
    ``start`` to ``stop`` over ``warmup_steps`` and then stays at ``stop``.
    ``"cyclical"`` (Fu et al., 2019): the step is taken modulo ``cycle_steps``; within each
    cycle beta rises linearly over the first ``ratio`` of it and then holds ``stop``.

    >>> schedule = KLWarmup(warmup_steps=100)
    >>> schedule(0), schedule(50), schedule(1000)
    (0.0, 0.5, 1.0)
    """

    def __init__(self, warmup_steps: int = 10000, *, mode: str = "linear", start: float = 0.0, stop: float = 1.0,
                 cycle_steps: int | None = None, ratio: float = 0.5):
        if mode not in ("linear", "cyclical"):
            raise ValueError(f"mode must be 'linear' or 'cyclical', got {mode!r}")
        for name, value in (("warmup_steps", warmup_steps), ("cycle_steps", cycle_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        for name, value in (("start", start), ("stop", stop), ("ratio", ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 <= start <= stop < float("inf"):
            raise ValueError(f"need 0 <= start <= stop < inf, got start={start}, stop={stop}")
        if mode == "cyclical":
            if cycle_steps is None or cycle_steps < 1:
                raise ValueError(f"cycle_steps must be >= 1 for mode='cyclical', got {cycle_steps}")
            if not 0 < ratio <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.warmup_steps, self.mode, self.start, self.stop = warmup_steps, mode, start, stop
        self.cycle_steps, self.ratio = cycle_steps, ratio

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.mode == "linear":
            ramp = self.warmup_steps
            position = step
        else:
            ramp = self.ratio * self.cycle_steps
            position = step % self.cycle_steps
        if ramp <= 0 or position >= ramp:
            return self.stop
        return self.start + (self.stop - self.start) * position / ramp
