"""Evaluation: perplexity, latency and throughput, peak memory, sizes, and the report."""

from .memory import peak_memory, track_peak_memory
from .params import count_parameters, dir_size_bytes, model_size_bytes
from .perplexity import perplexity
from .report import markdown_table, plot_curves, plot_kept_units, print_results, results_table, write_json
from .speed import decode_throughput, greedy_decode, prefill_latency
from .summary import evaluate_model

__all__ = [
    "count_parameters",
    "decode_throughput",
    "dir_size_bytes",
    "evaluate_model",
    "greedy_decode",
    "markdown_table",
    "model_size_bytes",
    "peak_memory",
    "perplexity",
    "plot_curves",
    "plot_kept_units",
    "prefill_latency",
    "print_results",
    "results_table",
    "track_peak_memory",
    "write_json",
]
