"""Independent random streams per (lineage seed, generation, purpose): reproducible, and they never collide."""

from __future__ import annotations

import numpy as np

FIT, SAMPLE, SCORE, FRESH, SUBSAMPLE, SELECT, NEON = range(7)  # the purposes of a generation's random numbers


def derive_seed(seed: int, generation: int, stream: int) -> int:
    """A 31-bit seed per (lineage seed, generation, purpose)."""
    return int(np.random.SeedSequence([seed, generation, stream]).generate_state(1)[0] >> 1)
