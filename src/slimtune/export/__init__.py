"""Merge, shrink and save."""

from ..masking.plan import decoder_param_count, layer_plan
from .save import export_model, is_uniform, layer_shapes, save_model
from .shrink import shrink_

__all__ = ["decoder_param_count", "export_model", "is_uniform", "layer_plan", "layer_shapes", "save_model", "shrink_"]
