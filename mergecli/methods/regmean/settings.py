"""RegMean's recipe table, `[regmean]`: the calibration settings of its statistics, and the merge's own."""

from __future__ import annotations

from pydantic import Field

from mergecli.recipe import Flag
from mergecli.stats.settings import CalibrationSettings


class RegMeanSettings(CalibrationSettings):
    """`[regmean]`: where the statistics are and how they were collected, α, and RegMean++."""

    reduce_non_diagonal_ratio: float = Field(default=0.6, ge=0.0, le=1.0)  # α
    sequential: Flag = False  # RegMean++: block l's Grams from inputs through the merged blocks 0..l-1
