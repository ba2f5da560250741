"""The registries of the parts ``tasks/`` plugs together (models/ holds the families' and estimators').

Each registry finds its entries in its package on first lookup (``models.registry``); the base classes and the
built-in entries live in those packages. The registries themselves live here, below everything that uses them,
so the params schema (``tasks.params``) can look names up without importing the parts.
"""

from __future__ import annotations

from models.registry import Registry

SOURCES = Registry("data source", package="tasks.sources")  # where a study's real data come from
MODES = Registry("loop mode", package="tasks.modes")  # how dataset k+1 is made
MITIGATIONS = Registry("mitigation", package="tasks.mitigations")  # what a lineage does against collapse
IMAGE_METRICS = Registry("image metric", package="tasks.metrics")  # what the image scorer measures
SCORERS = Registry("scorer", package="tasks.scorers")  # one per kind of family: image, scalar
