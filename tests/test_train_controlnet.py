"""Recipe tests for train_controlnet.py on a tiny model: golden losses, exact resume, validation images, the saved
ControlNet in diffusers' pipeline (both layouts), alignment of conditioning images, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.numerics import (CAPTIONS_LOST, FAMILY_CASE, assert_outputs_close, assert_process_split_close,
                            check_golden_losses, golden_case_args, training_deviation)
from tests.recipe_helpers import assert_averaged_once, logged_losses, one_and_two_processes, run_script


def run(argv: list[str], stop_after: int | None = None) -> None:
    run_script("train_controlnet", argv, stop_after)




def draw_pair(index: int, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """A photo and its 'edge map': asymmetric shapes, so a flip or shifted crop is visible."""
    rng = np.random.default_rng(index)
    photo = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    edges = Image.new("RGB", size, (0, 0, 0))
    for d in (ImageDraw.Draw(photo), ImageDraw.Draw(edges)):
        x, y = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
        box = (x, y, x + size[0] // 3, y + size[1] // 4)
        d.rectangle(box, outline=(255, 255, 255), width=2, fill=None)
        rng = np.random.default_rng(index)  # the same shape on both images
        rng.integers(0, 255, 3)
    return photo, edges


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return controlnet_workspace(tmp_path_factory.mktemp("controlnet"), {"sd1": "sd1", "sd2-768-v": "sd2v"})


def controlnet_workspace(root: Path, models: dict[str, str]) -> Path:
    """4 photos of 3 sizes with captions in data/2_sks shape/, their edge maps in cond/, the same as a local
    dataset (hfdata/: images, conditioning images, metadata.jsonl), and tiny models (family -> file stem)."""
    from tools.make_tiny_model import main as make_model

    images, cond = root / "data" / "2_sks shape", root / "cond"
    folder = root / "hfdata"
    for path in (images, cond, folder / "images", folder / "conditioning"):
        path.mkdir(parents=True)
    lines = []
    for i, size in enumerate([(64, 64), (96, 64), (64, 96), (64, 64)]):
        photo, edges = draw_pair(i, size)
        photo.save(images / f"{i:03d}.png")
        edges.save(cond / f"{i:03d}.png")
        (images / f"{i:03d}.caption").write_text(f"sks shape number {i}")
        photo.save(folder / "images" / f"{i}.png")
        edges.save(folder / "conditioning" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "conditioning_image": f"conditioning/{i}.png",
                                 "image_caption": f"a box, number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    for family, stem in models.items():
        assert make_model(["--family", family, str(root / f"{stem}.safetensors")]) == 0
    return root


def base_args(root: Path, out: str, model: str = "sd1.safetensors") -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--output_dir", str(root / out),
            "--output_name", "cn", "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
            "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--learning_rate", "1e-4", "--seed", "5",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--logging_dir", str(root / out / "logs")]


def folder_args(root: Path, out: str, model: str = "sd1.safetensors") -> list[str]:
    return base_args(root, out, model) + ["--train_data_dir", str(root / "data"), "--conditioning_data_dir",
                                          str(root / "cond")]


def read_file(path: Path) -> dict[str, torch.Tensor]:
    from library.safetensors_io import SafetensorsReader

    with SafetensorsReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}


CASES = {
    "folders_flip": (False, ["--flip_aug", "--max_train_steps", "4"]),
    "folders_cached_accum": (False, ["--cache_latents", "--gradient_accumulation_steps", "2", "--max_train_steps",
                                     "2", "--optimizer_type", "AdamW8bit"]),
    "dataset_name_diffusers_flags": (False, ["--dataset_name", "{root}/hfdata", "--caption_column", "image_caption",
                                             "--num_train_epochs", "1", "--proportion_empty_prompts", "0.5",
                                             "--control_net_lr", "2e-4", "--gradient_checkpointing"]),
    "sd2v": (True, ["--max_train_steps", "3"]),
}
# The option each case is there for (tests/golden/README.md: what removing it does to the losses).
COVERS = {
    "folders_flip": ["--flip_aug"],
    "folders_cached_accum": ["--cache_latents"],
    "dataset_name_diffusers_flags": CAPTIONS_LOST,
    "sd2v": FAMILY_CASE,
}


@pytest.mark.numbers
@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, workspace):
    root = workspace
    sd2, extra = CASES[case]
    model = "sd2v.safetensors" if sd2 else "sd1.safetensors"
    extra = [a.replace("{root}", str(root)) for a in golden_case_args(case, extra, COVERS)]
    argv = (base_args(root, f"golden_{case}", model) if "--dataset_name" in extra
            else folder_args(root, f"golden_{case}", model)) + extra
    run(argv)
    losses = logged_losses(root / f"golden_{case}" / "logs")
    check_golden_losses("controlnet_losses.json", case, losses)
    assert (root / f"golden_{case}" / "cn.safetensors").is_file()
    assert (root / f"golden_{case}" / "cn_diffusers" / "config.json").is_file()


def test_only_the_controlnet_trains(workspace):
    """The base model is frozen: the run changes nothing but the ControlNet, whose zero convolutions moved."""
    root = workspace
    run(folder_args(root, "frozen") + ["--max_train_steps", "2"])
    weights = read_file(root / "frozen" / "cn.safetensors")
    zero_convs = [k for k in weights if ".zero_convs." in k and k.endswith("weight")]
    assert zero_convs and any(weights[k].abs().max() > 0 for k in zero_convs)
    assert all(k.startswith("control_model.") for k in weights)


def test_resume_reproduces_the_uninterrupted_run(workspace):
    root = workspace
    extra = ["--max_train_steps", "5", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--flip_aug"]
    run(folder_args(root, "full") + extra)
    run(folder_args(root, "part") + extra, stop_after=3)
    # --checkpoints_total_limit 1: only the newest checkpoint (model files and state) is kept.
    assert sorted(p.name for p in (root / "part").iterdir() if p.name != "logs") == [
        "cn-step00000002-state", "cn-step00000002.safetensors", "cn-step00000002_diffusers"]
    run(folder_args(root, "part") + extra + ["--resume_from_checkpoint", "latest"])
    assert not (root / "part" / "cn-step00000002-state").exists() and (root / "part" / "cn-step00000004-state").is_dir()
    a, b = read_file(root / "full" / "cn.safetensors"), read_file(root / "part" / "cn.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(root / "full" / "logs") == logged_losses(root / "part" / "logs")


def test_two_processes_match_one_process_at_the_same_global_batch(workspace):
    """accelerate launch with 2 CPU processes x batch 1 == 1 process x batch 2 for a ControlNet, with gradient
    accumulation; 2 SGD steps, since the first moves only the zero convolutions (nothing upstream of a zero weight
    gets a gradient) and the second every weight. Tolerance: PROCESS_SPLIT_REL."""
    root = workspace
    common = ["--max_train_steps", "2", "--save_every_n_steps", "1", "--gradient_accumulation_steps", "2",
              "--optimizer_type", "SGD", "--learning_rate", "0.01", "--max_grad_norm", "0", "--save_model_as",
              "safetensors"]
    communication = one_and_two_processes("train_controlnet", folder_args(root, "split_one") + common,
                                          folder_args(root, "split_two") + common)
    assert_averaged_once(communication, optimizer_steps=2)
    assert communication["ddp_options"]["find_unused_parameters"] is False
    one, one_step1, two = (read_file(root / out / name) for out, name in (
        ("split_one", "cn.safetensors"), ("split_one", "cn-step00000001.safetensors"), ("split_two", "cn.safetensors")))
    assert_process_split_close(training_deviation(two, one, one_step1), what="train_controlnet")
    assert logged_losses(root / "split_two" / "logs") == pytest.approx(logged_losses(root / "split_one" / "logs"),
                                                                      rel=1e-5)


def test_validation_grid(workspace):
    root = workspace
    run(folder_args(root, "validation") + ["--max_train_steps", "2", "--validation_image", str(root / "cond" / "000.png"),
                                           "--validation_prompt", "a box", "a red box", "--validation_steps", "2",
                                           "--num_validation_images", "2", "--validation_inference_steps", "2"])
    grids = sorted((root / "validation" / "validation").glob("cn_000002_*.png"))
    assert [g.name for g in grids] == ["cn_000002_00.png", "cn_000002_01.png"]
    image = Image.open(grids[0])
    assert image.size == (64 * 3, 64)  # the conditioning image, then two samples
    condition = np.asarray(Image.open(root / "cond" / "000.png").convert("RGB"))
    assert np.array_equal(np.asarray(image)[:, :64], condition)


def test_validation_size_keeps_the_condition_aspect():
    from library.controlnet_training import validation_size

    assert validation_size((64, 96), (64, 64), 8) == (48, 72)  # scaled to the training area, 2:3 kept
    assert validation_size((1024, 1536), (512, 512), 8) == (416, 624)
    assert validation_size((100, 60), (512, 512), 8) == (96, 56)  # never upscaled; sides a multiple of 8
    assert validation_size((64, 64), (64, 64), 8) == (64, 64)


def test_validation_grid_of_a_portrait_condition_image(workspace):
    """A 64x96 condition image is sampled at its own aspect (48x72 at --resolution 64), not squashed square."""
    root = workspace
    run(folder_args(root, "validation_portrait") + [
        "--max_train_steps", "1", "--validation_image", str(root / "cond" / "002.png"), "--validation_prompt", "a box",
        "--validation_steps", "1", "--num_validation_images", "1", "--validation_inference_steps", "1"])
    (path,) = (root / "validation_portrait" / "validation").glob("cn_000001_00.png")
    row = Image.open(path)
    assert Image.open(root / "cond" / "002.png").size == (64, 96) and row.size == (48 * 2, 72)
    sample = np.asarray(row)[:, 48:]
    assert sample.shape[:2] == (72, 48) and sample.std() > 0  # a real sample, 2:3 like the condition image


@pytest.mark.numbers
def test_saved_controlnet_gives_the_trained_output_in_diffusers(workspace, tmp_path):
    """The ControlNet from our diffusers folder and from our single file (read by diffusers itself) equal the model
    at the end of training, and give the same StableDiffusionControlNetPipeline output."""
    from diffusers import StableDiffusionControlNetPipeline

    from library.model_loading import instantiate_models
    from library.samplers import make_scheduler
    from library.sd_checkpoint import read_checkpoint

    root = workspace
    run(folder_args(root, "export") + ["--max_train_steps", "2", "--save_state_on_train_end"])
    from_folder, from_file = saved_controlnets_hold_the_trained_weights(root / "export")

    with read_checkpoint(root / "sd1.safetensors") as checkpoint:
        models = instantiate_models(checkpoint)
    condition = Image.open(root / "cond" / "001.png").convert("RGB").resize((64, 64))
    outputs = []
    for controlnet in (from_folder, from_file):
        pipe = StableDiffusionControlNetPipeline(vae=models.vae, text_encoder=models.text_encoder,
                                                 tokenizer=models.tokenizer, unet=models.unet, controlnet=controlnet,
                                                 scheduler=make_scheduler("ddim", "epsilon"), safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        outputs.append(pipe("a box", image=condition, num_inference_steps=2, width=64, height=64, output_type="np",
                            generator=torch.Generator().manual_seed(0)).images)
    assert_outputs_close(outputs[0], outputs[1], what="ControlNet from our folder vs our single file")


def saved_controlnets_hold_the_trained_weights(out: Path):
    """The ControlNet of a run saved with --save_state_on_train_end (output name cn), read by diffusers itself from
    our folder (from_pretrained) and our single file (from_single_file, config from the folder): both hold exactly
    the trained weights. Returns (from_folder, from_file)."""
    from diffusers import ControlNetModel

    trained = torch.load(out / "cn-state" / "trainable.pt", weights_only=True)["models"]["controlnet"]
    from_folder = ControlNetModel.from_pretrained(str(out / "cn_diffusers"), local_files_only=True)
    from_file = ControlNetModel.from_single_file(str(out / "cn.safetensors"), config=str(out / "cn_diffusers"),
                                                 local_files_only=True)
    for model in (from_folder, from_file):
        state = model.state_dict()
        assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in trained)
    return from_folder, from_file


def test_conditioning_image_stays_aligned_through_bucket_crop_and_flip(workspace, tmp_path):
    """An asymmetric photo used as its own conditioning image: after bucketing, random crop and flip, the control
    tensor (0..1) equals the photo's pixels (-1..1) rescaled, at every position."""
    from library import train_args
    from library.dataset_sources import ConditioningUse
    from library.training_setup import build_dataset
    from library.families import FAMILIES
    from library.train_dataset import SampleKey

    data, cond = tmp_path / "data" / "1_x", tmp_path / "cond"
    data.mkdir(parents=True)
    cond.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(150, 70), (70, 150), (97, 97)]):
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(data / f"{i}.png")
        Image.fromarray(array).save(cond / f"{i}.png")
    import train_controlnet

    args = train_args.parse_args(train_controlnet.setup_parser(), [
        "--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path / "o"), "--train_data_dir",
        str(tmp_path / "data"), "--conditioning_data_dir", str(cond), "--resolution", "64", "--enable_bucket",
        "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--random_crop",
        "--flip_aug"])
    dataset, _ = build_dataset(args, FAMILIES["sd1"], 3, conditioning_use=ConditioningUse.CONTROL)
    flipped = 0
    for index in range(len(dataset)):
        for epoch in range(1, 4):
            key = SampleKey(epoch, 0, index, 0)
            sample = dataset[key]
            assert sample["control"].shape == sample["pixels"].shape and sample["control"].min() >= 0
            assert torch.allclose((sample["pixels"] + 1) / 2, sample["control"], atol=1e-6)
            flipped += dataset.flips(dataset.items[index], key)
    assert 0 < flipped < 3 * len(dataset)  # both flipped and unflipped samples were checked


# ----------------------------------------------------------------------------------------------------------
# Bad input


def expect_error(argv: list[str], *needles: str) -> None:
    with pytest.raises(SystemExit) as info:
        run(argv)
    message = str(info.value.code)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_and_extra_conditioning_images(workspace, tmp_path):
    import shutil

    root = workspace
    cond = tmp_path / "cond"
    shutil.copytree(root / "cond", cond)
    (cond / "001.png").unlink()
    Image.new("RGB", (64, 64)).save(cond / "999.png")
    argv = base_args(root, "bad1") + ["--train_data_dir", str(root / "data"), "--conditioning_data_dir", str(cond),
                                      "--max_train_steps", "1"]
    expect_error(argv, str(cond), "1 image(s) without a conditioning image: 001.png",
                 "1 conditioning image(s) without an image: 999.png")


def test_bad_columns_validation_and_family(workspace, tmp_path):
    root = workspace
    data = base_args(root, "bad2") + ["--dataset_name", str(root / "hfdata"), "--max_train_steps", "1"]
    expect_error(data + ["--conditioning_image_column", "edges", "--caption_column", "image_caption"],
                 "no column 'edges'", "--conditioning_image_column", "conditioning_image", "image_caption")
    expect_error(data + ["--image_column", "photo", "--caption_column", "image_caption"], "--image_column",
                 "it has: image, conditioning_image, image_caption")
    folder = folder_args(root, "bad3") + ["--max_train_steps", "1"]
    expect_error(folder + ["--validation_image", str(tmp_path / "nope.png"), "--validation_prompt", "x"],
                 "--validation_image", "nope.png")
    expect_error(folder + ["--validation_image", str(root / "cond" / "000.png"), str(root / "cond" / "001.png"),
                           "--validation_prompt", "a", "b", "c"], "--validation_image (2)", "--validation_prompt (3)")
    # An SD 1.x ControlNet on an SD 2.x base model.
    run(folder_args(root, "sd1_controlnet") + ["--max_train_steps", "1", "--save_model_as", "safetensors"])
    expect_error(folder_args(root, "bad4", "sd2v.safetensors") + [
        "--controlnet_model_name_or_path", str(root / "sd1_controlnet" / "cn.safetensors"), "--max_train_steps", "1"],
        "--controlnet_model_name_or_path", "cn.safetensors")


def test_proportion_empty_prompts_is_the_caption_dropout_rate():
    """The diffusers example's --proportion_empty_prompts is kohya's --caption_dropout_rate (whose rate is checked in
    test_captions.py); the golden losses cannot see it on a tiny model (tests/golden/README.md)."""
    import train_controlnet
    from library import train_args

    argv = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "o", "--proportion_empty_prompts",
            "0.3"]
    args = train_controlnet.diffusers_example_flags(train_args.parse_args(train_controlnet.setup_parser(), argv))
    assert args.caption_dropout_rate == 0.3


def test_fused_backward_pass_equals_the_normal_step(workspace):
    """--fused_backward_pass on the ControlNet (the optimizer stepped inside backward, parameter by parameter):
    the same weights and losses as the normal step, bit for bit (clipping off, where the two agree)."""
    root = workspace
    extra = ["--max_train_steps", "3", "--max_grad_norm", "0", "--save_model_as", "safetensors",
             "--optimizer_type", "AdamW"]
    run(folder_args(root, "cn_unfused") + extra)
    run(folder_args(root, "cn_fused") + extra + ["--fused_backward_pass"])
    a, b = read_file(root / "cn_unfused" / "cn.safetensors"), read_file(root / "cn_fused" / "cn.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(root / "cn_unfused" / "logs") == logged_losses(root / "cn_fused" / "logs")


def test_a_state_written_before_the_controlnet_could_be_sharded_still_loads():
    """A ControlNet run's trainable.pt holds {"models": {"controlnet": state dict}}, as the full-model trainers'
    (what FSDP's resume loads into the shards); a state written before held the state dict itself and still loads."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from library.controlnet_training import ControlNetTask

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    trained = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()  # no zero convolution left at zero: a load that misses anything shows
    state = ControlNetTask(trained, unet, family=None, save_as="both", save_dtype=None,
                           metadata={}).trainable_state()
    assert list(state) == ["models"] and list(state["models"]) == ["controlnet"]
    for saved in (state, state["models"]["controlnet"]):
        fresh = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
        ControlNetTask(fresh, unet, family=None, save_as="both", save_dtype=None,
                       metadata={}).load_trainable_state(saved)
        want, got = trained.state_dict(), fresh.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
