"""Model sources and architecture specs."""

from .arch import ArchSpec, get_arch, supported_model_types
from .source import bundled_model_dir, load_model, resolve_model_path

__all__ = ["ArchSpec", "bundled_model_dir", "get_arch", "load_model", "resolve_model_path", "supported_model_types"]
