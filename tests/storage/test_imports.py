"""The storage room must stay free of discord and torch (design.md: the arrows only point down)."""

from __future__ import annotations

import subprocess
import sys


def test_storage_imports_neither_discord_nor_torch() -> None:
    code = (
        "import sys, storage.db, storage.repo, storage.files, storage.intake\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'discord', 'torch', 'trainer', 'bot', 'cogs'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
