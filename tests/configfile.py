"""A bot config as a TOML file, for a bot started in its own process (``python -m bot run --config``) by the
tests (tests/cogs/test_first_run.py, test_exactly_once.py) and the ack-latency benchmark (bench/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """``{section: {key: value}}`` as TOML (values are strings, numbers, bools and lists: JSON writes them as
    TOML reads them)."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
