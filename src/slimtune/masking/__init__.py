"""Masks and how they act on a model. Masks know shapes, never criteria.

- `structured.py`: heads (query-head resolution, GQA-aware), MLP channels and whole layers;
- `gates.py`: structured masks applied as gates, so a masked model computes what the shrunk one does;
- `plan.py`: the kept units of each layer and the parameter count after shrinking;
- `weights.py`: unstructured / N:M masks on the merged weight (W0 + s·B·A) ⊙ M.
"""

from .gates import attach_gates, zero_pruned_weights
from .plan import decoder_param_count, layer_plan
from .structured import LayerGeometry, StructuredMasks
from .weights import WeightMasks, attach_weight_masks

__all__ = [
    "LayerGeometry",
    "StructuredMasks",
    "WeightMasks",
    "attach_gates",
    "attach_weight_masks",
    "decoder_param_count",
    "layer_plan",
    "zero_pruned_weights",
]
