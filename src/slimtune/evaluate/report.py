"""The before/after report: a rich table, a Markdown table, JSON, and PNG plots."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.table import Table

from ..io import atomic_write_bytes, atomic_write_json


class _Metric(NamedTuple):
    label: str
    key: str  # in an evaluate_model dict
    div: float = 1
    fmt: str = "{:.1f}"
    spread: tuple[str, str] | None = None  # (min key, max key) of the repeats, shown after the median
    ratio: bool = True  # whether pruned/dense means something
    optional: bool = False  # leave the line out when no row has the key (results saved before it existed)


# Sizes are MiB (2**20 bytes); the JSON keys keep their historical "_mb" names.
_METRICS = [
    _Metric("perplexity", "perplexity", fmt="{:.3f}"),
    _Metric("decoder params (M)", "params_decoder", 1e6, "{:.2f}"),
    _Metric("total params (M)", "params_total", 1e6, "{:.2f}"),
    _Metric("size (MiB)", "size_mb"),
    _Metric("prefill (ms)", "prefill_ms", spread=("prefill_ms_min", "prefill_ms_max")),
    _Metric("decode (tok/s)", "decode_tok_s", spread=("decode_tok_s_min", "decode_tok_s_max")),
    _Metric("peak memory (MiB)", "peak_memory_mb"),
    _Metric("load average (1 min)", "load_avg_1m", fmt="{:.2f}", ratio=False, optional=True),
]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _cell(row: dict, m: _Metric) -> tuple[float | None, str]:
    """(median, text): the text adds the [min-max] of the repeats when the row has them."""
    value = _number(row.get(m.key))
    value = None if value is None else value / m.div
    text = _fmt(value, m.fmt)
    if value is not None and m.spread:
        lo, hi = (_number(row.get(k)) for k in m.spread)
        if lo is not None and hi is not None:
            text += f" [{m.fmt.format(lo / m.div)}-{m.fmt.format(hi / m.div)}]"
    return value, text


def _grid(rows: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and body shared by the rich and Markdown tables: one line per metric."""
    names = list(rows)
    with_ratio = len(names) == 2
    header = ["metric", *names] + ([f"{names[1]}/{names[0]}"] if with_ratio else [])
    body = []
    for m in _METRICS:
        if m.optional and all(rows[name].get(m.key) is None for name in names):
            continue
        cells = [_cell(rows[name], m) for name in names]
        line = [m.label, *(text for _, text in cells)]
        if with_ratio:
            a, b = (value for value, _ in cells)
            ok = m.ratio and a is not None and b is not None and a != 0 and math.isfinite(a) and math.isfinite(b)
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


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average (alpha = 2 / (span + 1)), bias-corrected so it starts at the data."""
    alpha, avg, weight, out = 2 / (span + 1), 0.0, 0.0, []
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _series(history: list[dict], key: str) -> tuple[list, list]:
    points = [(h.get("step", i), h[key]) for i, h in enumerate(history) if _number(h.get(key)) is not None]
    return (list(xs) for xs in zip(*points)) if points else ([], [])


def mask_update_steps(history: list[dict]) -> list:
    """Steps at which the masks changed: the trainer adds "achieved" to those history rows."""
    return [h.get("step", i) for i, h in enumerate(history) if "achieved" in h]


def curves_figure(history: list[dict]):
    """Loss (raw, faint; an EMA on top; validation loss if recorded) and sparsity vs step, with the
    steps where the masks changed marked. Entries may lack any key; a missing "step" is the index."""
    fig, (loss_ax, sparsity_ax) = _figure(2, 10)
    xs, ys = _series(history, "loss")
    if xs:
        # Per-step loss is noisy enough to hide the trend; the EMA shows it, the raw line the noise.
        loss_ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        span = max(1, min(50, len(ys) // 10))
        loss_ax.plot(xs, ema(ys, span), color="tab:blue", label=f"loss (EMA, span {span})")
    vx, vy = _series(history, "val_loss")
    if vx:
        loss_ax.plot(vx, vy, color="tab:orange", marker="o", markersize=3, label="validation loss")
    sx, sy = _series(history, "sparsity")
    if sx:
        sparsity_ax.plot(sx, sy, color="tab:green", label="scheduled sparsity")
    mx, my = _series(history, "achieved")
    if mx:
        sparsity_ax.plot(mx, my, "x", color="tab:red", markersize=4, label="mask update (achieved)")
    updates = mask_update_steps(history)
    if len(updates) <= 40:  # more lines than that would just paint the plot red
        for i, step in enumerate(updates):
            loss_ax.axvline(step, color="tab:red", alpha=0.25, linewidth=0.8, label=None if i else "mask update")
    for ax, name, has in ((loss_ax, "loss", xs or vx), (sparsity_ax, "sparsity", sx or mx)):
        if has:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {name} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    return fig


def plot_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """PNG of `curves_figure(history)`."""
    return _save_png(curves_figure(history), path)


def kept_units_differ(per_layer: list[dict]) -> bool:
    """Whether layers keep different numbers of units. Under local ranking every layer keeps the
    same counts, and a bar chart of equal bars only repeats the table."""
    keys = ("removed", "heads_kept", "kv_heads_kept", "channels_kept")
    return len({tuple(row.get(k) for k in keys) for row in per_layer}) > 1


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
