"""Importance criteria: one file per criterion, one registry line each.

    imp = make_importance("taylor", model)          # registered name -> class + options
    for batch in batches:
        imp.update(model, batch)
    scores = imp.element_scores()   # {layer: {projection path: [out, in] fp32}}
    imp.remove()

Adding a criterion: subclass `Importance` in a new file, declare its capabilities (see base.py),
and add one `register(...)` line below; `tests/test_criteria.py` then runs the shared contract
on it once you add its name to the table there. docs/architecture.md walks through an example.
"""

from __future__ import annotations

from .base import GRANULARITIES, ElementScores, Importance, projection_weights
from .block_influence import BlockInfluence
from .l0 import L0Importance
from .loraprune import LoRAPruneImportance
from .magnitude import MagnitudeImportance
from .mask_fisher import MaskFisherImportance
from .movement import MovementImportance
from .random import RandomImportance
from .registry import CRITERIA, Criterion, get_criterion, make_importance, register
from .seven import SevenImportance
from .sparsegpt import SparseGPTImportance
from .taylor import TaylorImportance
from .wanda import WandaImportance

register("loraprune", LoRAPruneImportance, "LoRA-gradient importance while fine-tuning (LoRAPrune, arXiv 2305.18403)", metric="lora")
register("mask_fisher", MaskFisherImportance, "Fisher of the head/channel/layer gates from activation gradients while fine-tuning: exact group scores at LoRA memory (arXiv 2204.09656)")
register("loraprune_unc", LoRAPruneImportance, "LoRAPrune ranked by AdaLoRA's uncertainty-weighted smoothing EMA(I)·EMA(|I − EMA(I)|) (arXiv 2303.10512)",
         metric="lora", smoothing="uncertainty")
register("l0", L0Importance, "hard-concrete L0 gates on heads and channels, trained with a Lagrangian on the expected sparsity (CoFi, arXiv 2204.00408)")
register("grad", LoRAPruneImportance, "the same loop with the true weight gradient: the memory-hungry reference", metric="grad")
register("movement", MovementImportance, "movement pruning's cumulative signed score -Σ_t G·W while fine-tuning, G the LoRA-gradient estimate (arXiv 2005.07683)", metric="lora")
register("movement_grad", MovementImportance, "movement with the true weight gradient: full fine-tuning memory", metric="grad")
register("seven", SevenImportance, "SEVEN: cumulative Taylor |G·W| scaled by E|g|/√E[g²], which discounts weights with noisy gradients (arXiv 2403.12688); weight-sized moments", metric="lora")
register("seven_grad", SevenImportance, "SEVEN with the true weight gradient: full fine-tuning memory", metric="grad")
register("taylor", TaylorImportance, "first-order element-wise Taylor |g·w| (LLM-Pruner, arXiv 2305.11627)", variant="element1")
register("taylor2", TaylorImportance, "Taylor with the Fisher second-order term", variant="element2")
register("fisher", TaylorImportance, "second-order Taylor with the Fisher diagonal, Σ_b (g_b·w)² (Optimal Brain Damage)", variant="fisher")
register("taylor_vector", TaylorImportance, "vector-wise Taylor |Σ g·w| per unit", variant="vector")
register("magnitude", MagnitudeImportance, "|w| (L1)", p=1)
register("l2", MagnitudeImportance, "w² (L2)", p=2)
register("random", RandomImportance, "seeded random scores: the control")
register("block_influence", BlockInfluence, "1 - cos(x_in, x_out) per layer (ShortGPT, arXiv 2403.03853); layers only")
register("wanda", WandaImportance, "|w|·‖x‖ per output row, layer by layer (Wanda, arXiv 2306.11695); unstructured or nm")
register("sparsegpt", SparseGPTImportance, "OBS pruning with weight updates, layer by layer (SparseGPT, arXiv 2301.00774); unstructured or nm")

__all__ = [
    "CRITERIA",
    "GRANULARITIES",
    "BlockInfluence",
    "Criterion",
    "ElementScores",
    "Importance",
    "L0Importance",
    "LoRAPruneImportance",
    "MaskFisherImportance",
    "MagnitudeImportance",
    "MovementImportance",
    "RandomImportance",
    "SevenImportance",
    "SparseGPTImportance",
    "TaylorImportance",
    "WandaImportance",
    "get_criterion",
    "make_importance",
    "projection_weights",
    "register",
]
