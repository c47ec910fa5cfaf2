"""The one sanitiser for names that come from users: file names on disk, and names shown back to people.

Two jobs, kept apart:

- ``file_stem``: a name that becomes part of a path (an output name, an uploaded LoRA's file name, a pair
  name). ASCII letters, digits, ``_ . -`` and spaces only (the engine's ``FileName`` pattern in
  trainer/spec.py), starting with a letter or digit, at most ``max_len`` characters. Accents are folded
  (``Café`` -> ``Cafe``), everything else becomes ``_``; no ``/``, ``..`` or NUL can survive.
- ``display_text`` / ``display_file_name``: a name that is stored and echoed (an upload's original name, a
  refusal message). Control characters, bidirectional overrides (U+202E...), zero-width and other format
  characters are removed, whitespace runs become one space, and the result is capped (a file name keeps its
  extension). A file called ``\u202egnp.exe`` cannot show up as ``exe.png`` in a channel.

Torch-free and dependency-free: storage, bot and cogs all use it.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata

DISPLAY_MAX = 100
FILE_NAME_MAX = 100
ELLIPSIS = "\u2026"

_UNSAFE_FILE = re.compile(r"[^A-Za-z0-9_.\- ]+")
_DOTS = re.compile(r"\.{2,}")
_SPACES = re.compile(r"\s+")
# Unicode categories that never belong in a displayed name: controls (Cc), format characters (Cf: bidi
# embeddings/overrides/isolates, zero-width joiners, BOM...), surrogates, private use, unassigned. Line and paragraph
# separators become spaces.
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
_BREAKS = "\t\n\r\v\f\x85"  # controls that separate words: a space, not nothing


def display_text(text: str, max_len: int = DISPLAY_MAX) -> str:
    """``text`` fit to store and show: no control/bidi/format characters, single spaces, at most
    ``max_len`` characters (cut ones end with an ellipsis)."""
    kept = "".join(" " if c in _BREAKS or unicodedata.category(c) in ("Zl", "Zp") else c for c in str(text)
                   if c in _BREAKS or unicodedata.category(c) not in _DROP_CATEGORIES)
    out = _SPACES.sub(" ", unicodedata.normalize("NFC", kept)).strip()
    if len(out) > max_len:
        out = out[: max_len - 1].rstrip() + ELLIPSIS
    return out


def display_file_name(name: str, max_len: int = DISPLAY_MAX, default: str = "unnamed") -> str:
    """An uploaded file's name for display: cleaned like ``display_text``, capped to ``max_len`` characters
    keeping its extension (so ``a.png`` and ``a.txt`` still read as a pair)."""
    clean = display_text(name, max_len=10 * max_len) or default
    if len(clean) <= max_len:
        return clean
    stem, ext = posixpath.splitext(clean)
    if not ext or len(ext) > 12:
        return display_text(clean, max_len)
    return stem[: max_len - len(ext) - 1].rstrip() + ELLIPSIS + ext


def file_stem(text: str, default: str, max_len: int = FILE_NAME_MAX) -> str:
    """``text`` as a safe file-name part (see the module doc); ``default`` when nothing usable is left.
    Separators become ``_`` and dot runs one dot: ``../../x`` gives ``x``."""
    folded = unicodedata.normalize("NFKD", display_text(str(text), max_len=10 * max_len))
    ascii_only = folded.encode("ascii", "ignore").decode()
    out = _DOTS.sub(".", _UNSAFE_FILE.sub("_", ascii_only)).strip(" _.-")
    out = out[:max_len].rstrip(" _.-")
    return out or default
