"""Bucketing: golden ladders and assignments, crop geometry invariants, the PIL transform and the batch sampler.

The golden numbers were produced by kohya-ss/sd-scripts' own `make_bucket_resolutions` and
`BucketManager.select_bucket` (commit 48d368f, run once outside this repo on 120k random sizes, all identical).
"""

from __future__ import annotations

import random

import pytest
from PIL import Image

from library.buckets import (
    BucketAssigner, BucketBatchSampler, BucketChoice, BucketConfig, ImageTooSmallError,
    adjust_min_max_bucket_reso, apply_plan_to_image, bucket_report, format_bucket_table,
    make_bucket_resolutions, plan_resize_and_crop, shard,
)

LADDER_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
              (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
              (1024, 256)]
LADDER_768 = [(256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 960), (576, 1024),
              (640, 896), (704, 832), (768, 768), (832, 704), (896, 640), (960, 576), (1024, 256), (1024, 320),
              (1024, 384), (1024, 448), (1024, 512), (1024, 576)]


def assigner(resolution=(512, 512), **kwargs) -> BucketAssigner:
    return BucketAssigner(BucketConfig(resolution, enable_bucket=kwargs.pop("enable_bucket", True), **kwargs))


def random_sizes(count, seed=0, low=1, high=4000):
    rng = random.Random(seed)
    for _ in range(count):
        width = rng.randint(low, high)
        # a tenth of the sizes are extreme aspect ratios, up to 20:1 either way
        height = max(low, width // rng.randint(2, 20)) if rng.random() < 0.1 else rng.randint(low, high)
        yield (width, height) if rng.random() < 0.5 else (height, width)


# ---- ladder -----------------------------------------------------------------------------------------------------

def test_ladder_512():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == LADDER_512


def test_ladder_768():
    assert make_bucket_resolutions((768, 768), 256, 1024, 64) == LADDER_768


def test_ladder_1024_max_2048():
    ladder = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(ladder) == 41
    assert ladder[0] == (256, 2048) and ladder[-1] == (2048, 512)
    assert {(256, 2048), (2048, 256), (1024, 1024), (832, 1216), (1216, 832)} <= set(ladder)  # 8:1 extremes


@pytest.mark.parametrize("reso,low,high,step", [((512, 512), 256, 1024, 64), ((768, 512), 256, 1024, 64),
                                                ((1024, 1024), 512, 2048, 32), ((640, 448), 320, 960, 64)])
def test_ladder_invariants(reso, low, high, step):
    ladder = make_bucket_resolutions(reso, low, high, step)
    assert ladder == sorted(set(ladder))
    for width, height in ladder:
        assert width % step == 0 and height % step == 0
        assert width * height <= reso[0] * reso[1]
        assert (height, width) in ladder  # symmetric


def test_adjust_min_max():
    assert adjust_min_max_bucket_reso((512, 512), 300, 1000, 64) == (256, 1024)
    with pytest.raises(ValueError, match="--min_bucket_reso"):
        adjust_min_max_bucket_reso((512, 384), 448, 1024, 64)
    with pytest.raises(ValueError, match="--max_bucket_reso"):
        adjust_min_max_bucket_reso((1024, 768), 256, 960, 64)


def test_config_validation():
    assert BucketConfig((512, 512), enable_bucket=True).validate() == []
    with pytest.raises(ValueError, match="--bucket_reso_steps"):
        BucketConfig((512, 512), enable_bucket=True, bucket_reso_steps=36).validate()
    warnings = BucketConfig((512, 512), enable_bucket=True, bucket_reso_steps=32).validate(family_step=64)
    assert len(warnings) == 1 and "--bucket_reso_steps 32" in warnings[0]
    with pytest.raises(ValueError, match="--resolution"):
        BucketConfig((500, 500)).validate()
    with pytest.raises(ValueError, match="--max_bucket_reso"):
        BucketAssigner(BucketConfig((1024, 1024), enable_bucket=True, max_bucket_reso=768))
    # without bucketing kohya ignores min/max/steps entirely
    assert BucketConfig((1024, 1024), max_bucket_reso=10, bucket_reso_steps=3).validate() == []


# ---- assignment goldens -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,bucket,resized,error", [
    ((1024, 1024), (512, 512), (512, 512), 0.0),  # square, downscaled
    ((768, 512), (640, 384), (640, 427), 5 / 3 - 3 / 2),  # 3:2 has no exact bucket at 512^2
    ((512, 768), (384, 640), (427, 640), 3 / 5 - 2 / 3),  # 2:3
    ((4096, 512), (1024, 256), (2048, 256), 4 - 8),  # 8:1 lands in the widest bucket, cropped hard
    ((448, 576), (448, 576), (448, 576), 0.0),  # the size is itself a bucket
    ((100, 100), (512, 512), (512, 512), 0.0),  # tiny image: upscaled to cover
    ((300, 200), (640, 384), (640, 427), 5 / 3 - 3 / 2),
])
def test_assign_upscale_goldens(size, bucket, resized, error):
    choice = assigner().assign(size)
    assert (choice.bucket, choice.resized_size) == (bucket, resized)
    assert choice.aspect_error == pytest.approx(error, abs=1e-12)


@pytest.mark.parametrize("resolution,size,bucket,resized", [
    ((512, 512), (300, 300), (256, 256), (300, 300)),  # small: kept, bucket floored (crop, never pad)
    ((512, 512), (1536, 1536), (512, 512), (512, 512)),  # shrunk to the target area
    ((512, 512), (1500, 700), (704, 320), (704, 329)),  # width anchored: aspect error 0.057 beats 0.143
    ((512, 512), (2000, 1100), (576, 320), (582, 320)),  # height anchored: 0.018 beats 0.18
    ((512, 512), (1000, 667), (576, 384), (576, 384)),
    ((1024, 1024), (3072, 3000), (960, 960), (983, 960)),  # kohya's floor-to-step quirk (upstream PR #2352)
])
def test_assign_no_upscale_goldens(resolution, size, bucket, resized):
    choice = assigner(resolution, bucket_no_upscale=True, max_bucket_reso=2048).assign(size)
    assert (choice.bucket, choice.resized_size) == (bucket, resized)


def test_no_upscale_too_small_image():
    no_upscale = assigner(bucket_no_upscale=True)
    with pytest.raises(ImageTooSmallError, match="40x300"):
        no_upscale.assign((40, 300))
    with pytest.raises(ImageTooSmallError, match="not positive"):  # kohya #1836: (-1, -1) size gave -128 buckets
        no_upscale.assign((-1, -1))
    with pytest.raises(ImageTooSmallError):
        no_upscale.assign((100_000, 20))  # shrinking leaves the height under one step
    assert assigner().assign((40, 300)).bucket == (256, 1024)  # with upscaling it is just enlarged


def test_no_bucket_single_size():
    single = assigner(enable_bucket=False)
    assert single.buckets == ((512, 512),)
    assert single.assign((1024, 768)) == BucketChoice((512, 512), (683, 512), 1 - 4 / 3)
    assert single.assign((300, 400)) == BucketChoice((512, 512), (512, 683), 1 - 3 / 4)


@pytest.mark.parametrize("kwargs", [{}, {"bucket_no_upscale": True}, {"enable_bucket": False},
                                    {"bucket_reso_steps": 32, "max_bucket_reso": 2048}])
def test_assignment_invariants(kwargs):
    assign = assigner(**kwargs)
    steps = assign.config.bucket_reso_steps if assign.config.enable_bucket else 64
    for size in random_sizes(3000, seed=1, low=40):
        try:
            choice = assign.assign(size)
        except ImageTooSmallError:
            assert kwargs.get("bucket_no_upscale")
            continue
        (bw, bh), (rw, rh) = choice.bucket, choice.resized_size
        assert bw > 0 and bh > 0 and bw % steps == 0 and bh % steps == 0
        assert rw >= bw and rh >= bh  # covers the bucket
        assert abs(rw / rh - size[0] / size[1]) <= (size[0] / size[1]) * (1 / min(rw, rh) + 1e-9)  # aspect kept
        if kwargs.get("bucket_no_upscale"):
            assert rw <= size[0] and rh <= size[1]  # never upscaled
        else:
            assert choice.bucket in assign.buckets


# ---- crop plans and the PIL transform ---------------------------------------------------------------------------

def test_crop_plan_invariants_and_centring():
    assign = assigner()
    for size in random_sizes(2000, seed=2, low=8):
        choice = assign.assign(size)
        plan = plan_resize_and_crop(size, choice, random_crop=False, rng=None)
        (rw, rh), (bw, bh) = plan.resized_size, plan.bucket
        assert 0 <= plan.crop_left and plan.crop_left + bw <= rw and 0 <= plan.crop_top and plan.crop_top + bh <= rh
        assert plan.crop_left == (rw - bw) // 2 and plan.crop_top == (rh - bh) // 2
        assert plan.source_size == size


def test_random_crop_reproducible_and_in_bounds():
    choice = assigner().assign((1000, 400))  # -> bucket (896, 256), resized (1000-ish wide) with width overflow
    plans = [plan_resize_and_crop((1000, 400), choice, random_crop=True, rng=random.Random(7)) for _ in range(2)]
    assert plans[0] == plans[1]
    rng = random.Random(8)
    lefts = {plan_resize_and_crop((1000, 400), choice, random_crop=True, rng=rng).crop_left for _ in range(200)}
    spare = choice.resized_size[0] - choice.bucket[0]
    assert spare > 0 and len(lefts) > 1 and min(lefts) >= 0 and max(lefts) <= spare
    with pytest.raises(ValueError, match="rng"):
        plan_resize_and_crop((1000, 400), choice, random_crop=True, rng=None)


def test_apply_plan_gives_bucket_size_and_keeps_mask_aligned():
    assign = assigner()
    rng = random.Random(3)
    for size in [(768, 512), (100, 100), (4096, 512), (448, 576), (333, 777)]:
        photo = Image.new("RGB", size)
        # a white square marker in the middle of the photo must land at the same place in a half-size mask
        x0, y0 = size[0] // 2 - size[0] // 8, size[1] // 2 - size[1] // 8
        photo.paste((255, 255, 255), (x0, y0, x0 + size[0] // 4, y0 + size[1] // 4))
        mask = photo.convert("L").resize((size[0] // 2, size[1] // 2), Image.Resampling.BOX)
        plan = plan_resize_and_crop(size, assign.assign(size), random_crop=True, rng=rng)
        out_photo = apply_plan_to_image(photo, plan)
        out_mask = apply_plan_to_image(mask, plan)
        assert out_photo.size == plan.bucket and out_mask.size == plan.bucket
        photo_box = out_photo.convert("L").point(lambda v: 255 * (v > 127)).getbbox()
        mask_box = out_mask.point(lambda v: 255 * (v > 127)).getbbox()
        assert photo_box and mask_box and all(abs(a - b) <= 3 for a, b in zip(photo_box, mask_box))


def test_apply_plan_rejects_other_aspect_ratio():
    plan = plan_resize_and_crop((768, 512), assigner().assign((768, 512)), random_crop=False, rng=None)
    with pytest.raises(ValueError, match="aspect ratio"):
        apply_plan_to_image(Image.new("L", (512, 512)), plan)  # kohya would stretch this one


def test_apply_plan_resampling_follows_kohya():
    image = Image.effect_noise((200, 100), 64).convert("RGB")
    plan = plan_resize_and_crop((200, 100), BucketChoice((64, 32), (64, 32), 0.0), random_crop=False, rng=None)
    box = image.resize((64, 32), Image.Resampling.BOX)
    assert apply_plan_to_image(image, plan).tobytes() == box.tobytes()  # shrinking: area averaging
    plan = plan_resize_and_crop((200, 100), BucketChoice((384, 192), (384, 192), 0.0), random_crop=False, rng=None)
    lanczos = image.resize((384, 192), Image.Resampling.LANCZOS)
    assert apply_plan_to_image(image, plan).tobytes() == lanczos.tobytes()  # enlarging: lanczos


# ---- sampler ----------------------------------------------------------------------------------------------------

def dataset_buckets(count=500, seed=4):
    assign = assigner()
    return [assign.assign(size).bucket for size in random_sizes(count, seed=seed, low=64)]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_sampler_covers_each_item_once_in_single_buckets(batch_size):
    buckets = dataset_buckets()
    sampler = BucketBatchSampler(buckets, batch_size, seed=11)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert len(batches) == sampler.num_batches() == len(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(len(buckets)))
        for batch in batches:
            assert 1 <= len(batch) <= batch_size and len({buckets[i] for i in batch}) == 1
        partial = [b for b in batches if len(b) < batch_size]
        assert len(partial) <= len(set(buckets))  # at most one partial batch per bucket


def test_sampler_epochs_are_pure_functions_of_seed_and_epoch():
    buckets = dataset_buckets()
    fresh = BucketBatchSampler(buckets, 4, seed=5).batches(7)
    used = BucketBatchSampler(buckets, 4, seed=5)
    for epoch in range(7):
        used.batches(epoch)
    state = random.getstate()
    random.seed(123)  # global randomness must not matter
    assert used.batches(7) == fresh
    random.setstate(state)
    assert BucketBatchSampler(buckets, 4, seed=5).batches(8) != fresh
    assert BucketBatchSampler(buckets, 4, seed=6).batches(7) != fresh


def test_sampler_without_shuffle_and_drop_last():
    buckets = [(512, 512)] * 5 + [(640, 384)] * 3
    in_order = BucketBatchSampler(buckets, 2, seed=0, shuffle=False)
    assert in_order.batches(0) == in_order.batches(1) == [[0, 1], [2, 3], [4], [5, 6], [7]]  # buckets sorted
    dropped = BucketBatchSampler(buckets, 2, seed=0, drop_last=True)
    assert len(dropped) == 3 and all(len(batch) == 2 for batch in dropped.batches(0))
    with pytest.raises(ValueError):
        BucketBatchSampler(buckets, 0, seed=0)


@pytest.mark.parametrize("num_batches,num_processes", [(10, 1), (10, 2), (10, 3), (11, 4), (2, 3), (0, 2)])
def test_shard_splits_each_step_and_pads_the_tail(num_batches, num_processes):
    batches = [[i] for i in range(num_batches)]
    shards = [shard(batches, num_processes, p) for p in range(num_processes)]
    steps = -(-num_batches // num_processes)
    assert all(len(s) == steps for s in shards)
    for step in range(steps):
        assert [s[step] for s in shards] == [batches[(step * num_processes + p) % num_batches]
                                             for p in range(num_processes)]
    seen = [b[0] for s in shards for b in s]
    assert sorted(set(seen)) == list(range(num_batches))  # every batch once ...
    assert len(seen) - num_batches == steps * num_processes - num_batches  # ... plus the documented padding
    with pytest.raises(ValueError):
        shard(batches, num_processes, num_processes)


# ---- report -----------------------------------------------------------------------------------------------------

def test_bucket_report_and_table():
    report = bucket_report(assigner(), [((1024, 1024), 2), ((768, 512), 3), ((448, 576), 1), ((512, 512), 0)])
    assert report.rows == [((448, 576), 1), ((512, 512), 2), ((640, 384), 3)]
    assert report.mean_aspect_error == pytest.approx((5 / 3 - 3 / 2) / 4)  # without repeats: 4 images
    table = format_bucket_table(report.rows, report.mean_aspect_error)
    assert "bucket 1: resolution (512, 512), count: 2" in table and "mean ar error (without repeats)" in table
    assert "count: 0" not in format_bucket_table([((256, 256), 0), ((512, 512), 1)])
