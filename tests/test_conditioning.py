"""Same-stem companion images (loss masks now, ControlNet conditions later): pairing and pixel alignment."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from library.buckets import BucketAssigner, BucketConfig
from library.dataset_sources import DatasetError, Subset, scan_subset
from library.train_dataset import DatasetGroup, SampleKey, TrainingDataset


def write_pair(folder, masks, name, size, split):
    """An image whose left `split` columns are red, and a mask (at half resolution) white over the same part."""
    w, h = size
    image = np.full((h, w, 3), 255, np.uint8)
    image[:, :split] = (255, 0, 0)
    Image.fromarray(image).save(folder / f"{name}.png")
    mask = np.zeros((h // 2, w // 2, 3), np.uint8)
    mask[:, : split // 2] = 255
    Image.fromarray(mask).save(masks / f"{name}.png")


@pytest.mark.parametrize("random_crop", [False, True])
def test_mask_stays_aligned_through_bucketing_cropping_and_flipping(tmp_path, random_crop):
    folder, masks = tmp_path / "img", tmp_path / "mask"
    folder.mkdir()
    masks.mkdir()
    write_pair(folder, masks, "wide", (192, 96), 70)  # asymmetric: the red part is left of centre
    write_pair(folder, masks, "tall", (96, 160), 30)
    subset = Subset(image_dir=folder, conditioning_dir=masks, flip_aug=True, random_crop=random_crop)
    records, _ = scan_subset(subset)
    assigner = BucketAssigner(BucketConfig(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32,
                                           max_bucket_reso=128, bucket_reso_steps=32))
    dataset = TrainingDataset([DatasetGroup([(r, 1) for r in records], assigner, 1)], seed=3)
    for epoch in range(1, 6):
        for index in range(len(dataset)):
            sample = dataset[SampleKey(epoch, 0, index)]
            red = (sample["pixels"][1] < 0).float()  # green channel low = the red part
            mask = sample["mask"][0]
            assert mask.shape == red.shape
            disagree = (red != (mask > 0.5).float()).float().mean().item()
            assert disagree < 0.05, (epoch, index, disagree)  # only resampling seams may differ


def test_missing_and_extra_conditioning_images_are_named(tmp_path):
    folder, masks = tmp_path / "img", tmp_path / "mask"
    folder.mkdir()
    masks.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(folder / f"{name}.png")
    Image.new("RGB", (64, 64)).save(masks / "a.png")
    Image.new("RGB", (64, 64)).save(masks / "zzz.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) without a conditioning image: b.png; 1 conditioning "
                                           r"image\(s\) without an image: zzz.png"):
        scan_subset(Subset(image_dir=folder, conditioning_dir=masks))


def test_conditioning_with_another_aspect_ratio_is_refused(tmp_path):
    folder, masks = tmp_path / "img", tmp_path / "mask"
    folder.mkdir()
    masks.mkdir()
    Image.new("RGB", (128, 64)).save(folder / "a.png")
    Image.new("RGB", (64, 64)).save(masks / "a.png")
    records, _ = scan_subset(Subset(image_dir=folder, conditioning_dir=masks))
    dataset = TrainingDataset([DatasetGroup([(records[0], 1)], BucketAssigner(BucketConfig(resolution=(64, 64))), 1)],
                              seed=0)
    with pytest.raises(ValueError, match="mask/a.png.*aspect ratio"):
        dataset[SampleKey(1, 0, 0)]


@pytest.mark.parametrize("random_crop", [False, True])
def test_size_conditioning_describes_the_pixels_the_model_sees(tmp_path, random_crop):
    """SDXL's original size / crop / target ids of each sample, checked against the sample's pixels: a picture whose
    red channel ramps left to right and green top to bottom says where each pixel came from. With a flip the crop
    is measured in the flipped picture (kohya's rule), so the ids always describe what the model sees."""
    folder = tmp_path / "img"
    folder.mkdir()
    width, height = 192, 96
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    picture = np.stack([(xs + 0.5) / width * 255, (ys + 0.5) / height * 255, np.zeros_like(xs)], axis=-1)
    Image.fromarray(np.round(picture).astype(np.uint8)).save(folder / "ramp.png")
    records, _ = scan_subset(Subset(image_dir=folder, flip_aug=True, random_crop=random_crop))
    assigner = BucketAssigner(BucketConfig(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32,
                                           max_bucket_reso=128, bucket_reso_steps=32))
    dataset = TrainingDataset([DatasetGroup([(r, 1) for r in records], assigner, 1)], seed=5)
    seen = set()
    for epoch in range(1, 9):
        sample = dataset[SampleKey(epoch, 0, 0)]
        size, pixels = sample["size"], sample["pixels"] * 127.5 + 127.5
        target_h, target_w = pixels.shape[1:]
        assert size.original_size == (height, width) and size.target_size == (target_h, target_w)
        scale = max(target_w / width, target_h / height)  # resized to cover the bucket, then cropped
        top, left = size.crop_top_left
        flipped = dataset.flips(dataset.items[0], SampleKey(epoch, 0, 0))
        seen.add((flipped, left))
        for j in (0, target_w // 2, target_w - 1):
            x = (left + j + 0.5) / scale  # where column j is in the (flipped) picture
            expected = (width - x if flipped else x) / width * 255
            assert abs(pixels[0, :, j].mean().item() - expected) < 4, (epoch, j, flipped)  # resampling blur
        for i in (0, target_h - 1):
            y = (top + i + 0.5) / scale
            assert abs(pixels[1, i, :].mean().item() - y / height * 255) < 4, (epoch, i)
    assert any(f for f, _ in seen) and any(not f for f, _ in seen)  # both orientations were checked
    if random_crop:
        assert len({left for _, left in seen}) > 2  # and several crops
