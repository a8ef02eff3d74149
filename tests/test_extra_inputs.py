"""The extra U-Net inputs of inpainting, depth and extra-channel models (library/extra_inputs.py): synthetic masks,
the condition images' alignment with the photo through bucketing, crops and flips, and the training step's inputs
against the ones diffusers' own pipelines prepare at inference."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from library.extra_inputs import (ChannelsFeeder, ConditionImages, ConditionKind, DepthFeeder, InpaintingFeeder,
                                  MaskSettings, condition_images_for, synthetic_mask)
from library.families import DEPTH, EXTRA_CHANNELS, FAMILIES, INPAINTING, TEXT_TO_IMAGE, ModelSize
from library.images import ImageError


def test_synthetic_masks_follow_their_settings():
    settings = MaskSettings(full_mask_prob=0.3, max_shapes=2, min_size=0.2, max_size=0.4)
    rng = random.Random(5)
    masks = [synthetic_mask((96, 64), rng, settings) for _ in range(400)]
    full = [m for m in masks if m.all()]
    assert all(m.shape == (64, 96) and set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    assert 0.22 < len(full) / len(masks) < 0.38  # 0.3 expected; 400 draws: binomial sd 0.023, ~3.5 sd margin
    partial = [m for m in masks if not m.all()]
    assert all(m.any() for m in partial)
    # Two shapes of at most 0.4 x 0.4 of the image cover at most 32 % of it (+ rounding of the edges).
    assert max(m.mean() for m in partial) <= 2 * 0.4 * 0.4 + 0.02
    # A shape of at least 0.2 x 0.2 (an ellipse: pi/4 of that box) covers at least ~3 % of the image.
    assert min(m.mean() for m in partial) >= 0.2 * 0.2 * np.pi / 4 - 0.01
    again = [synthetic_mask((96, 64), random.Random(5), settings)]
    assert np.array_equal(again[0], masks[0])  # a function of the stream: resume draws the same masks


def test_mask_settings_refuse_impossible_values():
    for bad, flag in ((dict(full_mask_prob=1.5), "--inpaint_full_mask_prob"), (dict(max_shapes=0), "max_shapes"),
                      (dict(min_size=0.6, max_size=0.5), "--inpaint_mask_size")):
        with pytest.raises(ValueError, match=flag):
            MaskSettings(**bad)


def test_each_family_gets_its_condition_images():
    assert condition_images_for(TEXT_TO_IMAGE, 4) is None
    assert condition_images_for(INPAINTING, 9).kind is ConditionKind.INPAINT_MASK
    assert condition_images_for(DEPTH, 5).kind is ConditionKind.DEPTH_MAP
    assert condition_images_for(EXTRA_CHANNELS, 7) == ConditionImages(ConditionKind.CHANNELS, 3)
    assert condition_images_for(INPAINTING, 9).needs_pixels and not condition_images_for(DEPTH, 5).needs_pixels


# ----------------------------------------------------------------------------------------------------------
# Parity with diffusers' pipelines


def tiny_models(name: str):
    from library.tiny_models import build_random_models

    return build_random_models(FAMILIES[name], ModelSize.TINY, seed=0, perturb=False)


def test_inpainting_inputs_are_what_diffusers_inpaint_pipeline_prepares():
    """Our training step's [mask, masked-image latents] against StableDiffusionInpaintPipeline's own preparation of
    the same image and mask image (mask_processor, `init_image * (mask < 0.5)`, prepare_mask_latents) with the same
    generator: the same operations on the same bytes, so equal bit for bit."""
    from diffusers import StableDiffusionInpaintPipeline

    from library.samplers import make_scheduler
    from library.sampling import family_pipeline

    models = tiny_models("sd1-inpainting")
    pipe = family_pipeline(models, make_scheduler("euler", "epsilon"))
    assert isinstance(pipe, StableDiffusionInpaintPipeline)
    pipe.vae.config.scaling_factor = models.family.vae_scale_factor
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask_image = Image.fromarray(((rng.random((64, 96)) > 0.6) * 255).astype(np.uint8)).convert("L")
    pixels = pipe.image_processor.preprocess(image, height=64, width=96)
    mask = pipe.mask_processor.preprocess(mask_image, height=64, width=96)
    theirs_mask, theirs_latents = pipe.prepare_mask_latents(
        mask, pixels * (mask < 0.5), 1, 64, 96, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(3),
        False)

    grey = torch.from_numpy(np.asarray(mask_image, dtype=np.float32) / 255.0)[None, None]  # what the dataset loads
    feeder = InpaintingFeeder(models.vae, models.family.vae_scale_factor)
    latent_size = tuple(theirs_mask.shape[-2:])
    ours = feeder({"pixels": pixels, "condition": grey}, [torch.Generator().manual_seed(3)], latent_size)
    assert torch.equal(ours[:, :1], theirs_mask)
    assert torch.equal(ours[:, 1:], theirs_latents)
    # The check sees a masked image that was not masked:
    unmasked = feeder({"pixels": pixels, "condition": torch.zeros_like(grey)}, [torch.Generator().manual_seed(3)],
                      latent_size)
    assert (unmasked[:, 1:] - theirs_latents).abs().max() > 0.1


def test_depth_input_is_what_diffusers_depth2img_prepares():
    """The depth channel against StableDiffusionDepth2ImgPipeline.prepare_depth_map given the same depth map."""
    from library.samplers import make_scheduler
    from library.sampling import family_pipeline

    models = tiny_models("sd2-512-depth")
    pipe = family_pipeline(models, make_scheduler("euler", "epsilon"))
    depth = torch.rand(2, 64, 96, generator=torch.Generator().manual_seed(1)) * 7 + 2  # any scale: normalised
    image = torch.zeros(2, 3, 64, 96)
    theirs = pipe.prepare_depth_map(image, depth, 2, False, torch.float32, torch.device("cpu"))
    ours = DepthFeeder()({"condition": depth[:, None]}, [], tuple(theirs.shape[-2:]))
    assert torch.equal(ours, theirs)
    assert ours.amin() == -1 and ours.amax() == 1


def test_a_flat_depth_map_is_refused_by_name():
    with pytest.raises(ValueError, match=r"b\.png is flat"):
        DepthFeeder()({"condition": torch.stack([torch.rand(1, 16, 16), torch.ones(1, 16, 16)]),
                       "path": ["a.png", "b.png"]}, [], (4, 4))


def test_condition_channels_are_box_averaged_to_the_latents():
    condition = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(1, 2, 16, 16)
    ours = ChannelsFeeder()({"condition": condition}, [], (4, 4))
    assert torch.equal(ours, condition.reshape(1, 2, 4, 4, 4, 4).mean(dim=(3, 5)))


# ----------------------------------------------------------------------------------------------------------
# The dataset: condition images stay aligned with the photo


def patterned(width: int, height: int, seed: int) -> Image.Image:
    """Blocks of random colours: any shift, flip or rescale of a companion image shows."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width])


def aligned_dataset(tmp_path, condition: ConditionImages, *, mode: str = "RGB", write: bool = True):
    from library.dataset_config import build_training_dataset

    data, conditions = tmp_path / "data" / "2_sks", tmp_path / "cond"
    data.mkdir(parents=True, exist_ok=True)
    conditions.mkdir(exist_ok=True)
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80), (120, 72)] if write else []):
        photo = patterned(w, h, i)
        photo.save(data / f"{i}.png")
        (data / f"{i}.caption").write_text("sks")
        # The condition is the photo itself, at half size (same aspect: resized with it).
        photo.convert(mode).resize((w // 2, h // 2), Image.Resampling.BOX).resize((w, h), Image.Resampling.NEAREST) \
            .save(conditions / f"{i}.png")
    cli = {"train_data_dir": str(tmp_path / "data"), "batch_size": 1, "resolution": (64, 64), "enable_bucket": True,
           "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16, "random_crop": True,
           "flip_aug": True, "conditioning_data_dir": str(conditions)}
    dataset, _ = build_training_dataset(cli, None, family_step=8, seed=4, prior_loss_weight=1.0, max_train_steps=0,
                                        condition=condition)
    return dataset


def samples(dataset):
    from library.train_dataset import SampleKey

    for epoch in (1, 2, 3):
        for index in range(len(dataset)):
            key = SampleKey(epoch, 0, index)
            yield key, dataset[key]


def test_condition_channels_follow_the_photos_resize_crop_and_flip(tmp_path):
    dataset = aligned_dataset(tmp_path, ConditionImages(ConditionKind.CHANNELS, 3))
    crops, flips = set(), set()
    for key, sample in samples(dataset):
        item = dataset.items[key.index]
        plan, flip = dataset.sample_plan(item, key), dataset.flips(item, key)
        crops.add((plan.crop_left, plan.crop_top) != (0, 0))
        flips.add(flip)
        # The photo and its condition went through the same resize (per band), crop and flip: the same pixels up
        # to the condition's own half-size detour (a 2x2 box average, up to ~128 levels at block edges).
        assert sample["condition"].shape == sample["pixels"].shape
        close = (sample["condition"] - sample["pixels"]).abs() < 0.05
        assert close.float().mean() > 0.9, (key, close.float().mean())
        # A condition that drifted by a flip (or missed one) is caught by the same check:
        drifted = (sample["condition"].flip(-1) - sample["pixels"]).abs() < 0.05
        assert drifted.float().mean() < 0.5, key
    assert crops == {True, False} and flips == {True, False}  # both ways were exercised


def test_masks_and_depth_maps_follow_the_photo_too(tmp_path):
    for kind in (ConditionKind.INPAINT_MASK, ConditionKind.DEPTH_MAP):
        dataset = aligned_dataset(tmp_path / kind.name, ConditionImages(kind, 1), mode="L")
        for key, sample in samples(dataset):
            grey = (sample["pixels"] + 1) / 2  # the photo's luminance, as the mask / depth image holds it
            luminance = 0.299 * grey[0] + 0.587 * grey[1] + 0.114 * grey[2]
            assert sample["condition"].shape == (1, *sample["pixels"].shape[1:])
            assert ((sample["condition"][0] - luminance).abs() < 0.05).float().mean() > 0.9, key
            assert ((sample["condition"][0].flip(-1) - luminance).abs() < 0.05).float().mean() < 0.5, key


def test_inpainting_loads_pixels_with_cached_latents_and_draws_masks_per_sample(tmp_path):
    from library.dataset_config import build_training_dataset
    from library.train_dataset import SampleKey
    from tools.make_synthetic_dataset import write_dataset

    write_dataset(tmp_path / "data", images=3, size=64, seed=0, folder="2_sks")
    cli = {"train_data_dir": str(tmp_path / "data"), "batch_size": 1, "resolution": (64, 64)}
    dataset, _ = build_training_dataset(cli, None, family_step=8, seed=4, prior_loss_weight=1.0, max_train_steps=0,
                                        condition=ConditionImages(ConditionKind.INPAINT_MASK, 1,
                                                                  MaskSettings(full_mask_prob=0.0)))

    class Cache:  # stands in for LatentCache: the photo's latents are what may be cached
        def get(self, item, flip):
            return torch.zeros(4, 8, 8)

        def get_mask(self, item, flip):
            return None

    dataset.latent_cache = Cache()
    first, second = dataset[SampleKey(1, 0, 0)], dataset[SampleKey(2, 0, 0)]
    assert "latents" in first and first["pixels"].shape == (3, 64, 64)
    assert not torch.equal(first["condition"], second["condition"])  # a new mask each epoch, never cached
    assert torch.equal(first["condition"], dataset[SampleKey(1, 5, 0)]["condition"])  # a function of the key


def test_condition_images_that_do_not_fit_are_named_before_training(tmp_path):
    from library.dataset_sources import DatasetError

    # Checked from the headers when the dataset is built: channel count, then aspect ratio.
    with pytest.raises(DatasetError, match=r"cond/\d\.png: a condition image with 3 channel\(s\).*takes 2 extra "
                                           r"channel\(s\).*grayscale \+ alpha \(LA\)"):
        aligned_dataset(tmp_path / "a", ConditionImages(ConditionKind.CHANNELS, 2))
    dataset = aligned_dataset(tmp_path / "b", ConditionImages(ConditionKind.CHANNELS, 3))
    (tmp_path / "b" / "cond" / "2.png").unlink()
    Image.new("RGB", (80, 40)).save(tmp_path / "b" / "cond" / "2.png")
    with pytest.raises(DatasetError, match=r"cond/2\.png is 80x40, its image 80x80: another aspect ratio"):
        aligned_dataset(tmp_path / "b", ConditionImages(ConditionKind.CHANNELS, 3), write=False)
    # ... and at the step that loads it, should a file change after the check.
    from library.train_dataset import SampleKey

    with pytest.raises(ImageError, match=r"cond/2\.png"):
        for index in range(len(dataset)):
            dataset[SampleKey(1, 0, index)]


def test_a_depth_model_needs_a_depth_map_per_image(tmp_path):
    from library.dataset_config import build_training_dataset
    from library.dataset_sources import DatasetError
    from tools.make_synthetic_dataset import write_dataset

    write_dataset(tmp_path / "data", images=2, size=64, seed=0, folder="2_sks")
    cli = {"train_data_dir": str(tmp_path / "data"), "batch_size": 1, "resolution": (64, 64)}
    with pytest.raises(DatasetError, match=r"2_sks: this model takes a depth map with every image; give "
                                           r"conditioning_data_dir"):
        build_training_dataset(cli, None, family_step=8, seed=4, prior_loss_weight=1.0, max_train_steps=0,
                               condition=ConditionImages(ConditionKind.DEPTH_MAP, 1))


def test_the_synthetic_datasets_companions_trace_each_images_shape(tmp_path):
    """tools/make_synthetic_dataset.py --masks / --depth_maps / --edge_maps (the README walkthroughs' data): the mask
    is exactly where the shape was drawn, the depth map puts the shape nearest, the edges are its outline; the
    images themselves are the ones written without companions (the golden tests' data does not move)."""
    from tools.make_synthetic_dataset import main as make

    assert make([str(tmp_path / "a"), "--images", "4", "--masks", str(tmp_path / "m"), "--depth_maps",
                 str(tmp_path / "d"), "--edge_maps", str(tmp_path / "e")]) == 0
    assert make([str(tmp_path / "b"), "--images", "4"]) == 0
    for path in sorted((tmp_path / "a" / "10_sks shape").glob("*.png")):
        photo = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert np.array_equal(photo, np.asarray(Image.open(tmp_path / "b" / "10_sks shape" / path.name)))
        mask = np.asarray(Image.open(tmp_path / "m" / path.name)) > 127
        background = photo[~mask]
        assert (background == background[0]).all() and not (photo[mask] == background[0]).all(axis=1).any()
        depth = np.asarray(Image.open(tmp_path / "d" / path.name)).astype(int)
        assert depth[mask].min() > depth[~mask].max()
        edges = np.asarray(Image.open(tmp_path / "e" / path.name)) > 0
        assert edges.any() and (edges & ~mask).sum() <= edges.sum() * 0.6  # on the outline, around the inside
