"""Coefficients as small integers over one denominator, so that merges of bf16 and fp16 checkpoints come out
correctly rounded: a weighted sum of bf16 values with integer coefficients below 2^15 is exact in float32,
and one division at the end rounds it once. Decimal weights (0.3, 0.7, lambda = 0.5) are ratios of small
integers; computed as the float32 numbers nearest to them, a result that falls exactly halfway between two
bf16 values (common: a model's entry one unit from the base's, weighted by ½) lands a hair off that midpoint
and rounds the wrong way half of the time.
"""

from __future__ import annotations

import math
from fractions import Fraction

LARGEST = 2**15  # the largest integer coefficient: its product with a 9-bit value stays exact in float32
DENOMINATORS = 2**12  # the largest denominator tried for one value


def ratio(value: float) -> Fraction | None:
    """The fraction of smallest denominator (at most DENOMINATORS) that float64 rounds to `value`, if any."""
    if not math.isfinite(value):
        return None
    fraction = Fraction(value).limit_denominator(DENOMINATORS)
    return fraction if fraction.numerator / fraction.denominator == value else None


def common_fraction(values: list[float]) -> tuple[list[float], float] | None:
    """Integers n_i and a denominator d (both as floats) with n_i / d equal to values[i] as float64 gives
    it, every |n_i| and d at most LARGEST; None when the values are not such ratios."""
    fractions = [ratio(value) for value in values]
    return None if None in fractions else over_one_denominator(fractions)


def over_one_denominator(fractions: list[Fraction]) -> tuple[list[float], float] | None:
    """The fractions as integers over their least common denominator (divided by any common factor), or
    None when one is larger than LARGEST."""
    denominator = math.lcm(*(f.denominator for f in fractions)) if fractions else 1
    numerators = [f.numerator * (denominator // f.denominator) for f in fractions]
    if denominator > LARGEST or any(abs(n) > LARGEST for n in numerators):
        return None
    divisor = math.gcd(*numerators, denominator)
    return [float(n // divisor) for n in numerators], float(denominator // divisor)


def add_scaled_(base, total, scale: float):
    """base + scale · total, in place in `base` (float tensors of one dtype): as (d · base + n · total) / d
    where scale = n / d is a small fraction (exact terms, one rounding), else as one fused step."""
    exact = common_fraction([scale])
    if exact is None:
        return base.add_(total, alpha=scale)
    (numerator,), denominator = exact
    if denominator == 1.0:
        return base.add_(total, alpha=numerator)
    return base.mul_(denominator).add_(total, alpha=numerator).div_(denominator)
