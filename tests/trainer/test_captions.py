"""Captions: instance prompt + file caption, [filewords], trigger first, keep_tokens, shuffle, dropout."""

from __future__ import annotations

import random

import pytest

from trainer.data.captions import build_caption, caption_rng, process_caption, split_tags


@pytest.mark.parametrize(
    ("instance", "caption", "mode", "expected"),
    [
        ("sks girl", "red hair, smiling", "instance_and_caption", "sks girl, red hair, smiling"),
        ("sks girl", "smiling, sks girl, red hair", "instance_and_caption", "sks girl, smiling, red hair"),
        ("sks girl", "sks girl, smiling", "instance_and_caption", "sks girl, smiling"),
        ("sks girl", "sks girl standing in a park", "instance_and_caption", "sks girl standing in a park"),
        ("sks girl", None, "instance_and_caption", "sks girl"),
        ("", "red hair", "instance_and_caption", "red hair"),
        ("sks girl", "red hair", "caption_only", "red hair"),
        ("sks girl", None, "caption_only", "sks girl"),
        ("sks girl", "  ", "caption_only", "sks girl"),
        ("sks girl", "red hair", "instance_only", "sks girl"),
        ("photo of sks girl, [filewords]", "red hair, smiling", "instance_and_caption",
         "photo of sks girl, red hair, smiling"),
        ("photo of sks [FileWords]", "girl with red hair", "instance_and_caption", "photo of sks girl with red hair"),
        ("photo of sks girl, [filewords]", None, "instance_and_caption", "photo of sks girl"),
        ("photo of sks girl, [filewords]", "red hair", "instance_only", "photo of sks girl"),
        ("photo of sks girl, [filewords]", "red hair", "caption_only", "red hair"),
        ("photo of sks girl, [filewords]", None, "caption_only", "photo of sks girl"),
    ],
)
def test_build_caption(instance: str, caption: str | None, mode: str, expected: str) -> None:
    assert build_caption(instance, caption, mode) == expected  # type: ignore[arg-type]


def test_build_caption_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError):
        build_caption("sks", "x", "both")  # type: ignore[arg-type]


def test_trigger_first_inserted_moved_never_duplicated() -> None:
    r = random.Random(0)
    assert process_caption("red hair, smiling", trigger_word="sks", rng=r) == "sks, red hair, smiling"
    assert process_caption("red hair, sks, smiling", trigger_word="sks", rng=r) == "sks, red hair, smiling"
    assert process_caption("sks, red hair, SKS, smiling", trigger_word="sks", rng=r) == "sks, red hair, smiling"
    # a tag that holds the trigger as a word leads; no extra bare trigger is added
    assert process_caption("smiling, sks girl, sks", trigger_word="sks", rng=r) == "sks girl, smiling"
    # no false word matches
    assert process_caption("sksx, smiling", trigger_word="sks", rng=r) == "sks, sksx, smiling"
    assert process_caption(" a ,, b , ", rng=r) == "a, b"


def test_shuffle_keeps_trigger_and_first_tags_in_place() -> None:
    tags = [f"t{i}" for i in range(8)]
    caption = ", ".join(tags[:2] + ["sks"] + tags[2:])  # trigger in the middle
    orders = set()
    for seed in range(300):
        out = split_tags(process_caption(caption, trigger_word="sks", shuffle_tags=True, keep_tokens=2,
                                         rng=random.Random(seed)))
        assert out[:3] == ["sks", "t0", "t1"]
        assert sorted(out[3:]) == tags[2:]
        orders.add(tuple(out[3:]))
    assert len(orders) > 100  # the rest really is shuffled


def test_no_shuffle_keeps_order_and_keep_tokens_without_trigger() -> None:
    assert process_caption("c, a, b", shuffle_tags=False, rng=random.Random(1)) == "c, a, b"
    for seed in range(50):
        out = split_tags(process_caption("k, a, b, c, d", shuffle_tags=True, keep_tokens=1, rng=random.Random(seed)))
        assert out[0] == "k" and sorted(out[1:]) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_caption_dropout_rate(rate: float) -> None:
    r = random.Random(1234)
    n = 2000
    dropped = sum(process_caption("sks, a, b", trigger_word="sks", caption_dropout=rate, rng=r) == "" for _ in range(n))
    sd = (rate * (1 - rate) / n) ** 0.5
    assert abs(dropped / n - rate) < 4 * sd  # kohya: the whole caption, trigger included, is dropped


def test_dropout_extremes_and_same_rng_same_caption() -> None:
    assert process_caption("sks, a", trigger_word="sks", caption_dropout=1.0, rng=random.Random(0)) == ""
    assert process_caption("sks, a", trigger_word="sks", caption_dropout=0.0, rng=random.Random(0)) == "sks, a"
    args = {"trigger_word": "sks", "shuffle_tags": True, "caption_dropout": 0.2}
    a = [process_caption("a, b, c, d, e", rng=caption_rng(7, 2, i), **args) for i in range(20)]
    b = [process_caption("a, b, c, d, e", rng=caption_rng(7, 2, i), **args) for i in range(20)]
    assert a == b  # resume draws the same captions
