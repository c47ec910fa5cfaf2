"""storage.names: the one sanitiser for users' names (file names on disk, names shown back)."""

from __future__ import annotations

import pytest

from storage.names import display_file_name, display_text, file_stem
from trainer.spec import TrainSpec

RLO = "\u202e"


def test_display_text_drops_bidi_control_and_zero_width_and_caps() -> None:
    hostile = f"ok{RLO}gnp.exe\u2066x\u2069\u200b\x00\x1b[31mred\nline\u2028end"
    out = display_text(hostile)
    assert out == "okgnp.exex[31mred line end"
    assert display_text("é" * 300) == "é" * 99 + "\u2026"
    assert display_text("  a \t  b  ") == "a b"


def test_display_file_name_keeps_the_extension_when_capped() -> None:
    name = RLO + "x" * 200 + ".png"
    out = display_file_name(name)
    assert len(out) == 100 and out.endswith("\u2026.png") and RLO not in out
    assert display_file_name(RLO) == "unnamed"


@pytest.mark.parametrize(("raw", "want"), [
    ("../../etc/passwd", "etc_passwd"),
    ("..\\..\\win.ini", "win.ini"),
    ("Café au lait", "Cafe au lait"),
    (f"{RLO}evil\x00name", "evilname"),
    ("日本語", "lora"),
    ("/abs/path", "abs_path"),
    ("...", "lora"),
    ("a" * 300, "a" * 100),
])
def test_file_stem_is_always_a_valid_engine_file_name(raw: str, want: str) -> None:
    out = file_stem(raw, "lora")
    assert out == want
    assert "/" not in out and ".." not in out
    TrainSpec(output_name=out)  # the engine's FileName pattern accepts it
