"""The before/after report: a rich table, a Markdown table, JSON, and PNG plots."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..io import atomic_write_bytes, atomic_write_json

# (label, key in an evaluate_model dict, divisor, format)
_METRICS = [
    ("perplexity", "perplexity", 1, "{:.3f}"),
    ("decoder params (M)", "params_decoder", 1e6, "{:.2f}"),
    ("total params (M)", "params_total", 1e6, "{:.2f}"),
    ("size (MB)", "size_mb", 1, "{:.1f}"),
    ("prefill (ms)", "prefill_ms", 1, "{:.1f}"),
    ("decode (tok/s)", "decode_tok_s", 1, "{:.1f}"),
    ("peak memory (MB)", "peak_memory_mb", 1, "{:.1f}"),
]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _grid(rows: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and body shared by the rich and Markdown tables: one line per metric."""
    names = list(rows)
    with_ratio = len(names) == 2
    header = ["metric", *names] + ([f"{names[1]}/{names[0]}"] if with_ratio else [])
    body = []
    for label, key, div, fmt in _METRICS:
        values = [_number(rows[name].get(key)) for name in names]
        values = [None if v is None else v / div for v in values]
        line = [label, *(_fmt(v, fmt) for v in values)]
        if with_ratio:
            a, b = values
            ok = a is not None and b is not None and a != 0 and math.isfinite(a) and math.isfinite(b)
            line.append(f"{b / a:.3f}" if ok else "-")
        body.append(line)
    return header, body


def results_table(rows: dict[str, dict], title: str | None = None) -> Table:
    """A rich Table with one column per named result (e.g. {"dense": ..., "pruned": ...})."""
    header, body = _grid(rows)
    table = Table(title=title)
    table.add_column(header[0])
    for name in header[1:]:
        table.add_column(name, justify="right")
    for line in body:
        table.add_row(*line)
    return table


def print_results(rows: dict[str, dict], console: Console | None = None) -> None:
    (console or Console()).print(results_table(rows))


def markdown_table(rows: dict[str, dict]) -> str:
    """The same table as GitHub Markdown."""
    header, body = _grid(rows)
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_json(path, obj)


def _save_png(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


def _figure(ncols: int, width: float):
    # Figure without pyplot: no global state, no GUI backend, safe in threads and servers.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 3.6), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """PNG with loss vs step and sparsity vs step. Entries may lack any key; missing "step" = index."""
    fig, axes = _figure(2, 10)
    for ax, key in zip(axes, ("loss", "sparsity")):
        points = [
            (h.get("step", i), h[key]) for i, h in enumerate(history) if _number(h.get(key)) is not None
        ]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(points) < 50 else None)
        else:
            ax.text(0.5, 0.5, f"no {key} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    return _save_png(fig, path)


def plot_kept_units(per_layer: list[dict], path: str | os.PathLike) -> Path:
    """Per-layer bars: fraction of attention heads and of MLP channels kept; removed layers are 0."""

    def frac(d: dict, kept: str, total: str) -> float:
        if d.get("removed") or not d.get(total):
            return 0.0
        return d.get(kept, 0) / d[total]

    layers = [d.get("layer", i) for i, d in enumerate(per_layer)]
    heads = [frac(d, "heads_kept", "heads_total") for d in per_layer]
    channels = [frac(d, "channels_kept", "channels_total") for d in per_layer]
    fig, (ax,) = _figure(1, max(6, 0.35 * len(per_layer) + 2))
    x = range(len(per_layer))
    ax.bar([i - 0.2 for i in x], heads, width=0.4, label="heads kept")
    ax.bar([i + 0.2 for i in x], channels, width=0.4, label="MLP channels kept")
    for i, d in enumerate(per_layer):
        if d.get("removed"):
            ax.text(i, 0.02, "removed", rotation=90, ha="center", va="bottom", fontsize=8, color="tab:red")
    ax.set_xticks(list(x), [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
    return _save_png(fig, path)
