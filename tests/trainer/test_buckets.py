"""Aspect-ratio buckets: the bucket set, assignment, crop plans and the single-bucket batch order."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from trainer.data.buckets import (
    BucketBatchSampler,
    apply_plan,
    assign_bucket,
    center_crop_plan,
    fit_to_bucket,
    make_buckets,
    sdxl_size_conditioning,
)


def test_make_buckets_kohya_rules() -> None:
    buckets = make_buckets(512, step=64, min_side=256, max_side=1024)
    assert len(buckets) == len(set(buckets))
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
        assert (h, w) in buckets  # both orientations
    assert {(640, 384), (384, 640), (576, 448), (1024, 256)} <= set(buckets)
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_make_buckets_odd_settings() -> None:
    # resolution above max_side: the square is capped, sides stay multiples of step
    b = make_buckets(1024, step=64, min_side=100, max_side=768)
    assert (768, 768) in b and all(128 <= s <= 768 and s % 64 == 0 for wh in b for s in wh)
    with pytest.raises(ValueError):
        make_buckets(512, step=64, min_side=600, max_side=620)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((640, 384), (640, 384)), ((384, 640), (384, 640)), ((512, 512), (512, 512)), ((1024, 576), (640, 384)),
     ((1280, 768), (640, 384)), ((3000, 3000), (512, 512)), ((4000, 1000), (1024, 256))],
)
def test_assign_bucket_at_512(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert assign_bucket(*size, make_buckets(512)) == expected


def test_assign_bucket_log_distance_and_tie_to_larger_area() -> None:
    # 1:1 is equally far (in log ratio) from 2:1 and 1:2; same-ratio buckets: the larger one wins
    assert assign_bucket(100, 100, [(128, 64), (64, 128), (64, 64), (128, 128)]) == (128, 128)
    assert assign_bucket(100, 100, [(64, 128), (128, 64)]) == (128, 64)  # exact tie: same area, wider first
    # log distance, not linear: 1.9:1 is nearer 2:1 than 1.5:1 ... and 1:1.9 nearer 1:2 than 1:1.5
    assert assign_bucket(190, 100, [(200, 100), (150, 100)]) == (200, 100)
    assert assign_bucket(100, 190, [(100, 200), (100, 150)]) == (100, 200)


def test_fit_to_bucket_crop_offsets() -> None:
    # 1024x576 into 640x384: height governs (384/576 = 2/3), width 683 -> 43 px excess, 21 left
    plan = fit_to_bucket((1024, 576), (640, 384))
    assert plan.resize_to == (683, 384)
    assert (plan.crop_left, plan.crop_top) == (21, 0)
    resize_to, left, top = plan  # plain tuple unpacking works
    assert resize_to == (683, 384)
    # portrait into a square: width governs, vertical crop centred
    plan = fit_to_bucket((300, 500), (512, 512))
    assert plan.resize_to == (512, 853) and (plan.crop_left, plan.crop_top) == (0, 170)
    # exact fit: nothing to crop
    assert fit_to_bucket((640, 384), (640, 384)) == ((640, 384), 0, 0)
    assert center_crop_plan((800, 600), 512) == fit_to_bucket((800, 600), (512, 512))
    assert center_crop_plan((800, 600), 512).resize_to == (683, 512)
    assert sdxl_size_conditioning((1024, 576), fit_to_bucket((1024, 576), (640, 384)), (640, 384)) == (
        576, 1024, 0, 21, 384, 640)


def test_apply_plan_crops_the_centre() -> None:
    # a 200x100 image whose middle 100 columns are white: into a square it keeps exactly that middle
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 150, 100))
    plan = center_crop_plan(img.size, 100)
    out = apply_plan(img, plan, (100, 100))
    assert out.size == (100, 100)
    assert plan == ((200, 100), 50, 0)
    assert min(out.getdata()) == (255, 255, 255)


def _keys() -> list[tuple[int, int]]:
    sizes = [(640, 384)] * 7 + [(384, 640)] * 5 + [(512, 512)] * 9 + [(1024, 576)] * 4 + [(4000, 1000)]
    buckets = make_buckets(512)
    return [assign_bucket(w, h, buckets) for w, h in sizes]


def test_batches_single_bucket_every_item_once() -> None:
    keys = _keys()
    sampler = BucketBatchSampler(keys, batch_size=4, seed=7)
    expected_len = sum(math.ceil(n / 4) for n in sampler.buckets.values())
    assert len(sampler) == expected_len
    for epoch in range(5):
        batches = sampler.batches(epoch)
        assert len(batches) == expected_len
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(keys)))  # every item exactly once
        for b in batches:
            assert 1 <= len(b) <= 4
            assert len({keys[i] for i in b}) == 1  # one bucket per batch
        # leftovers form smaller batches, at most one per bucket
        assert sum(len(b) < 4 for b in batches) <= len(sampler.buckets)


def test_batches_deterministic_and_shuffled() -> None:
    keys = _keys()
    a = BucketBatchSampler(keys, batch_size=2, seed=3)
    b = BucketBatchSampler(keys, batch_size=2, seed=3)
    assert a.batches(4) == b.batches(4)  # resume: a fresh sampler reproduces the order
    assert a.batches(4) == a.batches(4)
    assert a.batches(0) != a.batches(1)
    assert a.batches(0) != BucketBatchSampler(keys, batch_size=2, seed=4).batches(0)
    # batch_at walks the run across epochs without replaying them
    n = len(a)
    assert a.batch_at(0) == (0, a.batches(0)[0])
    assert a.batch_at(n + 2) == (1, a.batches(1)[2])
    assert b.batch_at(3 * n + 1) == (3, a.batches(3)[1])


def test_sampler_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        BucketBatchSampler([], batch_size=1, seed=0)
    with pytest.raises(ValueError):
        BucketBatchSampler([(1, 1)], batch_size=0, seed=0)
