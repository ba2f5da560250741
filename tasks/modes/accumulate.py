"""Accumulate (Gerstgrasser et al. 2024): the real data plus every generation's samples so far."""

from tasks.datasets import Dataset
from tasks.modes import MODES, LoopMode


@MODES.register("accumulate")
class Accumulate(LoopMode):
    """Dataset k plus model k's samples."""

    accumulates = True

    def next_dataset(self, k, current, synthetic):
        return Dataset.concat([current, synthetic])
