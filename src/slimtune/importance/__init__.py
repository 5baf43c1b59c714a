"""Importance criteria: one file per criterion, all behind the `Importance` interface (base.py).

    imp = make_importance("taylor", model, variant="element1")
    for batch in batches:
        imp.update(model, batch)
    scores = imp.element_scores()   # {layer: {projection path: [out, in] fp32}}
    imp.remove()

Adding a criterion: subclass `Importance` in a new file and add it to `CRITERIA`.
"""

from __future__ import annotations

from ..errors import SlimtuneError
from ..models.arch import base_weight
from ..training.loss import causal_lm_loss
from .base import ElementScores, Importance, projection_weights
from .block_influence import BlockInfluence
from .magnitude import MagnitudeImportance
from .random import RandomImportance
from .taylor import TaylorImportance

CRITERIA: dict[str, type[Importance]] = {
    cls.name: cls for cls in (RandomImportance, MagnitudeImportance, TaylorImportance, BlockInfluence)
}


def make_importance(name: str, model, **kwargs) -> Importance:
    cls = CRITERIA.get(name)
    if cls is None:
        raise SlimtuneError(f"unknown criterion '{name}'; choose one of {', '.join(sorted(CRITERIA))}")
    return cls(model, **kwargs)


__all__ = [
    "CRITERIA",
    "BlockInfluence",
    "ElementScores",
    "Importance",
    "MagnitudeImportance",
    "RandomImportance",
    "TaylorImportance",
    "base_weight",
    "causal_lm_loss",
    "make_importance",
    "projection_weights",
]
