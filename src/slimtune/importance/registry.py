"""The criterion registry: CLI name -> class, fixed options and declared capabilities.

Capabilities are class attributes of each criterion (see `Importance`); the registry adds the
options that turn one class into several named criteria (taylor, taylor2, taylor_vector ...).
Everything that selects units asks the registry first, so a criterion that cannot score a
granularity is refused before any work instead of pruning by index.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import SlimtuneError
from .base import GRANULARITIES, Importance


@dataclass(frozen=True)
class Criterion:
    name: str
    cls: type[Importance]
    options: dict = field(default_factory=dict)
    help: str = ""

    @property
    def scores(self) -> frozenset[str]:
        return self.cls.scores_for(self.options)

    @property
    def mode(self) -> str:
        return self.cls.mode

    @property
    def needs_data(self) -> bool:
        return self.cls.needs_data_for(self.options)

    @property
    def needs_grad(self) -> bool:
        return self.cls.needs_grad

    def build(self, model, **overrides) -> Importance:
        return self.cls(model, **{**self.options, **overrides})

    def check_targets(self, spec, num_layers: int, targets: set[str], units: set[str], layers: list[int]) -> None:
        """What the LoRA targets leave unscorable, before any adapter is attached (see Importance)."""
        self.cls.check_targets(spec, num_layers, targets, units, layers, {"name": self.name, **self.options})

    def check_units(self, units: Iterable[str]) -> None:
        """Refuse granularities this criterion cannot score (one line, before any work)."""
        missing = [u for u in GRANULARITIES if u in set(units) and u not in self.scores]
        if missing:
            able = sorted(c.name for c in CRITERIA.values() if set(missing) <= c.scores)
            raise SlimtuneError(
                f"criterion '{self.name}' cannot score {', '.join(missing)} (it scores {', '.join(sorted(self.scores))}); "
                f"pass --granularity {','.join(sorted(self.scores & {'heads', 'channels', 'layers'})) or 'unstructured'} "
                f"or a criterion that scores {', '.join(missing)}: {', '.join(able)}"
            )


CRITERIA: dict[str, Criterion] = {}
# progressive: scored while LoRA trains; one_shot: scored once on calibration batches, then pruned;
# layerwise: pruned layer by layer, each calibrated on the already-pruned earlier layers
MODES = ("progressive", "one_shot", "layerwise")


def register(name: str, cls: type[Importance], help: str = "", **options) -> None:
    unknown = set(cls.scores) - set(GRANULARITIES)
    if unknown or cls.mode not in MODES:
        raise ValueError(f"criterion {name}: bad capabilities {sorted(unknown)} / mode {cls.mode!r}")
    CRITERIA[name] = Criterion(name, cls, options, help)


def get_criterion(name: str) -> Criterion:
    entry = CRITERIA.get(name)
    if entry is None:
        raise SlimtuneError(f"unknown criterion '{name}'; choose one of {', '.join(CRITERIA)}")
    return entry


def make_importance(name: str, model, **overrides) -> Importance:
    """Build the registered criterion `name` for `model` (registry options, then `overrides`)."""
    return get_criterion(name).build(model, **overrides)
