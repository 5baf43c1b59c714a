"""Shared helpers for the benchmarks: machine description, medians, JSON output."""

from __future__ import annotations

import shlex
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# what every row of benchmarks/standard_preset.py passes to `slimtune prune` (make_tables.py strips it)
STANDARD_OPTIONS = ["--preset", "standard", "--mixed-precision", "bf16", "--no-eval", "--quiet"]


def machine() -> dict:
    from slimtune.evaluate.machine import machine_info

    return machine_info()


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def write(name: str, payload: dict) -> Path:
    from slimtune.evaluate.machine import utc_now
    from slimtune.io import atomic_write_json

    payload = {"benchmark": name, "date": utc_now(),
               "command": command(), "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, payload)
    print(f"wrote {path}")
    return path
