"""Several lineages' generations in lockstep, their fits stacked into one batched computation.

S lineages of one recipe that differ only in their seed (``seeds: [...]`` in params) train the same model on
datasets of one shape, so generation k of all S can be fitted at once (``models.estimators.stacked``): on a GPU
this costs about what one fit costs. Every other step (sample, score, next dataset, save) is each lineage's own
:func:`tasks.generation.run_generation`, given the model its member of the stacked fit made; each member is
trained with the seed its own run would use (``derive_seed(seed, k, FIT)``), so a lockstep lineage is its
single run in distribution, and with S = 1 the same run (tests/test_stacked.py).
"""

from __future__ import annotations

from dataclasses import replace

from models.estimators import ESTIMATORS
from models.estimators.stacked import fit_stacked, stackable
from models.families import FittedTorchModel
from tasks.datasets import Dataset
from tasks.generation import PLAIN, Generation, Lineage, Steps, run_generation
from tasks.mitigations import Mitigation
from tasks.params import section
from tasks.seeds import FIT, derive_seed


def stack_key(lineage: Lineage) -> str | None:
    """What lineages must share to be fitted together (their recipe but for name and seed), or None when this one
    cannot be: its estimator does not train the family by minibatches, or its mitigation weights the fit (its
    weights are computed inside the generation)."""
    weights_fit = type(lineage.mitigation).training_weights is not Mitigation.training_weights
    if weights_fit or not stackable(lineage.spec.estimator, lineage.family):
        return None
    recipe = {k: v for k, v in lineage.recipe.items() if k not in ("lineage.name", "lineage.seed")}
    return repr(sorted(recipe.items())) + str(lineage.device)


def lockstep_groups(lineages: list[Lineage]) -> list[list[Lineage]]:
    """The lineages in groups that can run in lockstep (a lineage that cannot is a group of one), in order."""
    groups: dict[str, list[Lineage]] = {}
    for i, lineage in enumerate(lineages):
        groups.setdefault(stack_key(lineage) or f"alone-{i}", []).append(lineage)
    return list(groups.values())


def fit_lockstep(lineages: list[Lineage], k: int, datasets: list[Dataset]) -> list[FittedTorchModel]:
    """Model k of every lineage of one group, fitted as one stacked computation with each lineage's own seed."""
    first = lineages[0]
    if any(stack_key(lin) is None or stack_key(lin) != stack_key(first) for lin in lineages):
        raise ValueError(f"lineages {[lin.name for lin in lineages]} cannot share a stacked fit (stack_key differs)")
    entry = ESTIMATORS.entry(first.spec.estimator)
    sections = {path.rsplit(".", 1)[-1]: section(first.params, path) for path in entry.settings}
    return fit_stacked(entry.name, first.family, [d.pixels for d in datasets],
                       seeds=[derive_seed(lin.seed, k, FIT) for lin in lineages], device=first.device,
                       groups=[d.label for d in datasets], **sections)


def run_lockstep_generation(lineages: list[Lineage], k: int, datasets: list[Dataset],
                            steps: Steps = PLAIN) -> list[Generation]:
    """Generation k of every lineage of one group: the stacked fit, then each lineage's own generation around
    its model (``steps.fit`` is replaced by the model already fitted)."""
    models = fit_lockstep(lineages, k, datasets)
    return [run_generation(lin, k, dataset, replace(steps, fit=lambda *_, fitted=model: fitted))
            for lin, dataset, model in zip(lineages, datasets, models)]
