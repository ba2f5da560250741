"""The fully synthetic loop (Alemohammad et al. 2023): dataset k+1 is model k's samples alone."""

from tasks.modes import MODES, LoopMode


@MODES.register("replace")
class Replace(LoopMode):
    """Only the last model's samples."""

    def next_dataset(self, k, current, synthetic):
        return synthetic
