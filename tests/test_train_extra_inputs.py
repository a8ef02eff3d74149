"""Recipe tests: the trainers on tiny inpainting, depth and extra-channel models (synthetic and user masks, depth
maps, condition images): golden losses, exact resume, and bad input answered before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.safetensors_io import SafetensorsReader
from tests.numerics import PlantedBug, _patch, check_golden_losses, golden_case_args
from tests.recipe_helpers import logged_losses, run_script

MODELS = {"sd1-inpainting": "inpaint.safetensors", "sd2-512-depth": "depth.safetensors",
          "sd1-extra": "extra.safetensors", "sdxl-inpainting": "sdxl_inpaint.safetensors"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("extra_inputs")
    images = sorted(write_dataset(root / "data", images=4, size=64, seed=0, folder="2_sks shape").glob("*.png"))
    for folder in ("masks", "depth", "cond"):
        (root / folder).mkdir()
    for i, path in enumerate(images):
        photo = Image.open(path).convert("RGB")
        w, h = photo.size
        mask = Image.new("L", (w, h), 0)
        mask.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))  # repaint the middle
        mask.save(root / "masks" / path.name)
        # A depth map: a ramp from top (far) to bottom (near) plus the photo's shapes standing out.
        ramp = np.linspace(0, 160, h, dtype=np.float32)[:, None] + np.asarray(photo.convert("L"), np.float32) / 3
        Image.fromarray(ramp.astype(np.uint8), "L").save(root / "depth" / path.name)
        # Two condition channels (the tiny extra-channel model takes 2): grayscale + a second band, as LA.
        Image.merge("LA", (photo.convert("L"), photo.getchannel("B"))).save(root / "cond" / path.name)
    (root / "meta.json").write_text(json.dumps({p.stem: {"caption": f"sks shape number {i}"}
                                                for i, p in enumerate(images)}))
    for family, name in MODELS.items():
        assert make_model(["--family", family, str(root / name)]) == 0
    return root


def common(root: Path, out: str, model: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / MODELS[model]), "--output_dir", str(root / out),
            "--output_name", "model", "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
            "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--seed", "5", "--train_batch_size", "2",
            "--max_data_loader_n_workers", "0", "--logging_dir", str(root / out / "logs")]


LORA = ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3"]


def _masked_image_unmasked():
    from library import extra_inputs

    def unmasked_image(original):
        def call(self, batch, gens, size):
            mask = original(self, batch, gens, size)[:, :1]
            nothing_masked = dict(batch, condition=torch.zeros_like(batch["condition"]))
            return torch.cat([mask, original(self, nothing_masked, gens, size)[:, 1:]], dim=1)
        return call
    return _patch(extra_inputs.InpaintingFeeder, "__call__", unmasked_image)


def _mask_channel_lost():
    from library import extra_inputs

    def zero_mask(original):
        def call(self, batch, gens, size):
            out = original(self, batch, gens, size)
            return torch.cat([torch.zeros_like(out[:, :1]), out[:, 1:]], dim=1)
        return call
    return _patch(extra_inputs.InpaintingFeeder, "__call__", zero_mask)


def _depth_not_normalised():
    from library import extra_inputs

    return _patch(extra_inputs.DepthFeeder, "__call__", lambda original: lambda self, batch, gens, size:
                  torch.nn.functional.interpolate(batch["condition"].float(), size=size, mode="bicubic"))


def _conditions_lost():
    from library import extra_inputs

    return _patch(extra_inputs.ChannelsFeeder, "__call__", lambda original: lambda self, batch, gens, size:
                  torch.zeros_like(original(self, batch, gens, size)))


MASKED_IMAGE_UNMASKED = PlantedBug("the masked image keeps the area to repaint", _masked_image_unmasked)
MASK_CHANNEL_LOST = PlantedBug("the mask channel is zero", _mask_channel_lost)
DEPTH_NOT_NORMALISED = PlantedBug("the depth map is not scaled to [-1, 1]", _depth_not_normalised)
CONDITIONS_LOST = PlantedBug("the condition channels are zero", _conditions_lost)

DATA = ["--train_data_dir", "{root}/data"]
FT_DATA = ["--train_data_dir", "{root}/data/2_sks shape", "--in_json", "{root}/meta.json"]
CASES = {
    "lora_inpaint_cached": ("train_network", "sd1-inpainting", DATA + LORA + ["--cache_latents", "--max_train_steps", "4"]),
    "lora_inpaint_user_masks_flip": ("train_network", "sd1-inpainting", DATA + LORA + [
        "--conditioning_data_dir", "{root}/masks", "--flip_aug", "--max_train_steps", "3"]),
    "db_inpaint_full_masks": ("train_db", "sd1-inpainting", DATA + [
        "--learning_rate", "1e-4", "--inpaint_full_mask_prob", "0.9", "--max_train_steps", "3"]),
    "ft_inpaint": ("fine_tune", "sd1-inpainting", FT_DATA + ["--learning_rate", "1e-4", "--max_train_steps", "3"]),
    "db_depth": ("train_db", "sd2-512-depth", DATA + ["--learning_rate", "1e-4", "--conditioning_data_dir",
                                                      "{root}/depth", "--max_train_steps", "3"]),
    "ft_extra_channels_flip": ("fine_tune", "sd1-extra", FT_DATA + [
        "--learning_rate", "1e-4", "--conditioning_data_dir", "{root}/cond", "--flip_aug", "--max_train_steps", "3"]),
    "sdxl_lora_inpaint": ("sdxl_train_network", "sdxl-inpainting", DATA + LORA + [
        "--cache_latents", "--max_train_steps", "3"]),
}
# What each case guards (tests/golden/README.md: what removing the option or planting the bug does to the losses).
COVERS = {
    "lora_inpaint_cached": MASKED_IMAGE_UNMASKED,
    "lora_inpaint_user_masks_flip": ["--conditioning_data_dir", "{root}/masks"],
    "db_inpaint_full_masks": ["--inpaint_full_mask_prob", "0.9"],
    "ft_inpaint": MASK_CHANNEL_LOST,
    "db_depth": DEPTH_NOT_NORMALISED,
    "ft_extra_channels_flip": CONDITIONS_LOST,
    "sdxl_lora_inpaint": MASKED_IMAGE_UNMASKED,
}


@pytest.mark.numbers
@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, workspace):
    root = workspace
    script, model, extra = CASES[case]
    extra = [a.replace("{root}", str(root)) for a in golden_case_args(case, extra, COVERS)]
    run_script(script, common(root, f"golden_{case}", model) + extra)
    check_golden_losses("extra_inputs_losses.json", case, logged_losses(root / f"golden_{case}" / "logs"))
    with SafetensorsReader(root / f"golden_{case}" / "model.safetensors") as reader:
        assert all(torch.isfinite(reader.read(k)).all() for k in reader.keys())


def test_inpainting_lora_resumes_exactly(workspace):
    """Synthetic masks and the masked image's latents are drawn from each step's own streams: killed after 2 of 5
    steps and resumed, the LoRA is bit-identical to the uninterrupted run's."""
    root = workspace
    args = DATA + LORA + ["--max_train_steps", "5", "--save_every_n_steps", "2", "--save_state", "--flip_aug"]
    args = [a.replace("{root}", str(root)) for a in args]
    run_script("train_network", common(root, "straight", "sd1-inpainting") + args)
    run_script("train_network", common(root, "resumed", "sd1-inpainting") + args, stop_after=2)
    assert not (root / "resumed" / "model.safetensors").exists()
    run_script("train_network", common(root, "resumed", "sd1-inpainting") + args +
               ["--resume", str(root / "resumed" / "model-step00000002-state")])
    readers = [SafetensorsReader(root / run / "model.safetensors") for run in ("straight", "resumed")]
    with readers[0] as a, readers[1] as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())


def test_a_full_finetune_saves_the_inpainting_model_it_trained(workspace):
    """train_db on an inpainting model writes an inpainting model (9-channel conv_in, its modelspec id), which reads
    back as that family."""
    from library.sd_checkpoint import read_checkpoint

    root = workspace
    run_script("train_db", common(root, "db_saved", "sd1-inpainting") +
               [a.replace("{root}", str(root)) for a in DATA] + ["--max_train_steps", "1"])
    with read_checkpoint(root / "db_saved" / "model.safetensors") as checkpoint:
        assert checkpoint.family.name == "sd1-inpainting"
        assert checkpoint.metadata.get("modelspec.architecture") == "stable-diffusion-v1/inpaint"


@pytest.mark.parametrize("extra, needles", [
    (["--conditioning_data_dir", "{root}/nothere"], ["nothere: no such conditioning folder"]),
    (["--masked_loss", "--conditioning_data_dir", "{root}/masks"], ["--masked_loss", "inpainting mask"]),
    (["--conditioning_data_dir", "{root}/few"], ["every image needs exactly one same-stem conditioning image",
                                                 "image(s) without a conditioning image"]),
    (["--conditioning_data_dir", "{root}/half"], ["half/000.png is 16x48", "another aspect ratio"]),
], ids=["missing folder", "masked loss", "wrong count", "mask of another shape"])
def test_bad_masks_are_answered_before_anything_is_written(workspace, extra, needles, capsys):
    root = workspace
    (root / "few").mkdir(exist_ok=True)
    Image.new("L", (64, 64), 255).save(root / "few" / "000.png")
    (root / "half").mkdir(exist_ok=True)
    for path in (root / "masks").glob("*.png"):
        Image.open(path).crop((0, 0, 16, 48)).save(root / "half" / path.name)  # another aspect ratio
    out = root / "bad"
    argv = common(root, "bad", "sd1-inpainting") + [a.replace("{root}", str(root)) for a in DATA + LORA + extra] + [
        "--max_train_steps", "2"]
    with pytest.raises(SystemExit) as exited:
        run_script("train_network", argv)
    message = str(exited.value.code)
    assert message.startswith("error:"), message
    for needle in needles:
        assert needle in message, message
    assert not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("model, extra, needles", [
    ("sd2-512-depth", [], ["this model takes a depth map with every image", "conditioning_data_dir"]),
    ("sd1-extra", ["--conditioning_data_dir", "{root}/masks"], ["000.png: a condition image with 1 channel(s)",
                                                                "takes 2 extra channel(s)"]),
    ("sd2-512-depth", ["--conditioning_data_dir", "{root}/depth", "--inpaint_full_mask_prob", "0.5"],
     ["--inpaint_full_mask_prob", "not an inpainting model"]),
], ids=["depth without maps", "wrong channel count", "mask flags on a depth model"])
def test_bad_conditions_are_answered_clearly(workspace, model, extra, needles):
    root = workspace
    argv = common(root, "bad_cond", model) + [a.replace("{root}", str(root)) for a in DATA + extra] + [
        "--max_train_steps", "1"]
    with pytest.raises(SystemExit) as exited:
        run_script("train_db", argv)
    message = str(exited.value.code)
    for needle in needles:
        assert needle in message, message
    assert not (root / "bad_cond" / "model.safetensors").exists()


def test_a_text_to_image_model_refuses_the_inpainting_flags(workspace, tmp_path):
    from tools.make_tiny_model import main as make_model

    assert make_model(["--family", "sd1", str(tmp_path / "sd1.safetensors")]) == 0
    argv = common(workspace, "bad_t2i", "sd1-inpainting") + [a.replace("{root}", str(workspace)) for a in DATA + LORA]
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / "sd1.safetensors")
    for extra, needle in ((["--inpaint_mask_size", "0.2", "0.3"], "--inpaint_mask_size: synthetic inpainting masks"),
                          (["--conditioning_data_dir", str(workspace / "masks")], "without --masked_loss")):
        with pytest.raises(SystemExit) as exited:
            run_script("train_network", argv + extra + ["--max_train_steps", "1"])
        assert needle in str(exited.value.code), exited.value.code


@pytest.mark.parametrize("variant, base", [("sd1-inpainting", "sd1"), ("sdxl-inpainting", "sdxl"),
                                           ("sd2-512-depth", "sd2-512"), ("sd1-extra", "sd1")])
def test_a_lora_of_a_variant_has_the_base_models_modules(variant, base):
    """LoRA (with conv layers) on an inpainting / depth / extra-channel model trains the modules it trains on the
    base model, with the same names and shapes: the first convolution, the only layer that differs, is not one of
    them. So a LoRA trained on SD 1.5 fits SD 1.5 inpainting and the reverse."""
    from library.families import FAMILIES, ModelSize
    from library.tiny_models import build_random_models
    from networks.lora import create_network

    def lora_shapes(name):
        models = build_random_models(FAMILIES[name], ModelSize.TINY, seed=0, perturb=False)
        encoders = models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
        network = create_network(1.0, 4, 2, models.vae, encoders, models.unet, conv_dim=4, conv_alpha=1)
        network.apply_to(encoders, models.unet)
        return {k: tuple(v.shape) for k, v in network.state_dict().items()}

    ours, theirs = lora_shapes(variant), lora_shapes(base)
    assert ours == theirs and any("conv" in k for k in ours)
