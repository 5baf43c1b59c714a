"""Text for calibration, fine-tuning and evaluation: sources, a deterministic split, packing, batches.

    texts = load_texts("wiki", "train")                  # list of documents
    tokens = load_tokens("wiki", tok, "test", 512)       # LongTensor [n, 512]
    batch = batch_at(tokens, batch_size=8, seed=0, step=123)
"""

from .packing import batch_at, iterate_batches, load_tokens, pack
from .sources import held_out, load_texts
from .splits import SPLITS, split_of
from .wiki import bundled_wiki_path, clean_wikitext, wiki_articles

__all__ = [
    "SPLITS",
    "batch_at",
    "bundled_wiki_path",
    "clean_wikitext",
    "held_out",
    "iterate_batches",
    "load_texts",
    "load_tokens",
    "pack",
    "split_of",
    "wiki_articles",
]
