"""Where the benchmarks leave their results: benchmarks/out/NAME.json, which report.py
reads."""

from __future__ import annotations

import json
import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def sized(name: str, params_m: float) -> str:
    """``name`` at the default 50 M parameters, ``name-200m`` at ``--params-m 200``."""
    return name if params_m == 50 else f"{name}-{params_m:g}m"


def write_result(name: str, result: dict, folder: str = OUT) -> str:
    """``result`` as ``folder/name.json``; its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path
