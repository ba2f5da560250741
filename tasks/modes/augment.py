"""Augment (Bertrand et al. 2024): the fixed real data plus the newest samples, in a fixed proportion."""

from tasks.datasets import Dataset
from tasks.modes import MODES, LoopMode, RealFractionSettings


@MODES.register("augment", settings={"loop": RealFractionSettings})
class Augment(LoopMode):
    """Every real row, and as many of model k's samples as make the real share ``loop.real_fraction``."""

    def synthetic_rows(self):
        fraction = self.context.settings["loop"].real_fraction
        return max(1, round(len(self.context.real.train) * (1 - fraction) / fraction))

    def next_dataset(self, k, current, synthetic):
        return Dataset.concat([self.context.real.train, synthetic])
