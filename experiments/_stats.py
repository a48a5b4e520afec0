"""Interval helpers shared by the experiment summaries (bootstraps over prompts and items come from
:mod:`latentlab.steering`; this is the across-seed one)."""

from __future__ import annotations

import math

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # t_{0.975, df=1..10}


def seed_interval(vals: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval across seeds (n - 1 degrees of freedom); NaN bounds for one seed.

    Seeds are the replication unit of a finetuning experiment, so this is the interval for "does
    this finetune do it"; bootstraps over prompts only say the effect is consistent across prompts.
    """
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = T975[min(n - 1, len(T975)) - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half
