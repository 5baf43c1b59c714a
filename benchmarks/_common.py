"""Shared helpers for the benchmarks: machine description, medians, JSON output."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def write(name: str, payload: dict) -> Path:
    from slimtune.io import atomic_write_json

    payload = {"benchmark": name, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "command": command(), "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, payload)
    print(f"wrote {path}")
    return path
