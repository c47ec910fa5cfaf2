"""Captions: what each image trains with (built once per image) and the per-step processing (kohya style).

API (pure functions; randomness only from the `random.Random` you pass in):

- `build_caption(instance_prompt, file_caption, mode) -> str` — once per image, at scan time.
  `mode` is `Concept.caption_mode`:
    'instance_and_caption': "instance, caption"; tags of the caption equal to a tag of the instance
                            prompt are dropped (no "sks girl, sks girl, smiling"), and a natural-language
                            caption that already starts with the instance prompt is used as it is.
    'caption_only':         the file caption; an image without one falls back to the instance prompt.
    'instance_only':        the instance prompt; file captions are ignored.
  The DreamBooth extension's `[filewords]` token in the instance prompt is replaced by the file caption
  (by nothing when there is none, or in 'instance_only'); the caption is then not appended a second time.
  'caption_only' uses the caption alone whenever there is one, [filewords] or not.
- `process_caption(caption, *, trigger_word, shuffle_tags, keep_tokens, caption_dropout, rng) -> str`
  — every time a sample is drawn (each step), with `rng = caption_rng(seed, epoch, sample_index)` so a
  resumed run draws the same captions. Order of operations:
    1. caption dropout: with probability `caption_dropout` the result is "" (kohya's
       caption_dropout_rate: the WHOLE caption, trigger word included, is dropped, so the model also
       learns the unconditional case). One `rng.random()` is drawn whatever the rate, so changing the
       rate does not change the shuffles.
    2. split on commas, strip, drop empty tags.
    3. the trigger word leads: the first tag containing it as a whole word (e.g. "sks girl" for "sks")
       moves to the front, or the trigger is inserted when no tag has it; other tags equal to it are
       removed (never duplicated). Matching ignores case.
    4. the first `keep_tokens` tags AFTER the trigger stay in place; the rest are shuffled when
       `shuffle_tags`. Note: kohya's keep_tokens counts the trigger itself, so kohya's
       `keep_tokens=1` equals `trigger_word=... , keep_tokens=0` here.
  Returns the tags joined with ", ".
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Literal

CaptionMode = Literal["instance_and_caption", "caption_only", "instance_only"]
FILEWORDS = "[filewords]"


def _clean(text: str | None) -> str:
    return " ".join((text or "").split())


def split_tags(caption: str) -> list[str]:
    return [t for t in (_clean(p) for p in caption.split(",")) if t]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


def _tidy(text: str) -> str:
    # After substituting [filewords] with nothing, "photo of sks, , smiling" must not keep stray commas.
    return join_tags(split_tags(text)) if "," in text else _clean(text)


def build_caption(instance_prompt: str, file_caption: str | None, mode: CaptionMode) -> str:
    instance = _clean(instance_prompt)
    caption = _clean(file_caption)
    if mode not in ("instance_and_caption", "caption_only", "instance_only"):
        raise ValueError(f"unknown caption mode {mode!r}")
    if FILEWORDS in instance.lower():
        words = "" if mode == "instance_only" else caption
        filled = _tidy(re.sub(re.escape(FILEWORDS), lambda _: words, instance, flags=re.IGNORECASE))
        if mode == "caption_only":
            # No caption: the instance prompt without the placeholder, like any caption-less image.
            return caption or filled
        return filled
    if mode == "instance_only":
        return instance
    if mode == "caption_only":
        return caption or instance
    if not caption:
        return instance
    if not instance:
        return caption
    low_caption, low_instance = caption.lower(), instance.lower()
    if low_caption == low_instance or re.match(re.escape(low_instance) + r"(?!\w)", low_caption):
        return caption  # "sks girl smiling in a park" already says it
    instance_tags = split_tags(instance)
    seen = {t.lower() for t in instance_tags}
    return join_tags(instance_tags + [t for t in split_tags(caption) if t.lower() not in seen])


def _has_word(tag: str, word: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", tag, flags=re.IGNORECASE) is not None


def put_trigger_first(tags: list[str], trigger_word: str | None) -> tuple[list[str], str | None]:
    """(tags without the trigger tag, the leading trigger tag or None)."""
    trigger = _clean(trigger_word)
    if not trigger:
        return list(tags), None
    lead = next((t for t in tags if _has_word(t, trigger)), trigger)
    if lead.lower() == trigger.lower():
        lead = trigger  # the configured spelling, not the caption's "SKS"
    rest: list[str] = []
    lead_taken = False
    for t in tags:
        if not lead_taken and t.lower() == lead.lower():
            lead_taken = True
            continue
        if t.lower() == trigger.lower():
            continue  # a second copy of the trigger
        rest.append(t)
    return rest, lead


def process_caption(
    caption: str,
    *,
    trigger_word: str | None = None,
    shuffle_tags: bool = False,
    keep_tokens: int = 0,
    caption_dropout: float = 0.0,
    rng: random.Random,
) -> str:
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError("caption_dropout must be between 0 and 1")
    if keep_tokens < 0:
        raise ValueError("keep_tokens must not be negative")
    drop = rng.random() < caption_dropout  # drawn always: see the module docstring
    if drop:
        return ""
    tags, lead = put_trigger_first(split_tags(caption), trigger_word)
    fixed, tail = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle_tags and len(tail) > 1:
        rng.shuffle(tail)
    return join_tags(([lead] if lead else []) + fixed + tail)


def caption_rng(*parts: int | str) -> random.Random:
    """A Random seeded from e.g. (seed, epoch, sample_index): stable across runs (sha256, not hash())."""
    digest = hashlib.sha256(":".join(str(p) for p in ("caption", *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))
