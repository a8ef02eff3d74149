"""Recipe tests for sdxl_train_control_net.py on the tiny SDXL model: golden losses, exact resume, the size/crop
conditioning reaching the ControlNet, kohya's two learning rates, the saved ControlNet in diffusers'
StableDiffusionXLControlNetPipeline (folder and single file), validation grids, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.numerics import CAPTIONS_LOST, SIZE_IDS_LOST, assert_outputs_close, check_golden_losses, golden_case_args
from tests.recipe_helpers import logged_losses, run_script
from tests.test_train_controlnet import controlnet_workspace, read_file, saved_controlnets_hold_the_trained_weights


def run(argv: list[str], stop_after: int | None = None, script: str = "sdxl_train_control_net") -> None:
    run_script(script, argv, stop_after)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return controlnet_workspace(tmp_path_factory.mktemp("sdxl_controlnet"), {"sdxl": "sdxl", "sd1": "sd1"})


def base_args(root: Path, out: str, model: str = "sdxl.safetensors") -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--output_dir", str(root / out),
            "--output_name", "cn", "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
            "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--learning_rate", "1e-4", "--seed", "5",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--logging_dir", str(root / out / "logs")]


def folder_args(root: Path, out: str, model: str = "sdxl.safetensors") -> list[str]:
    return base_args(root, out, model) + ["--train_data_dir", str(root / "data"), "--conditioning_data_dir",
                                          str(root / "cond")]


CASES = {
    "sdxl_folders_te_cache_flip": ["--cache_text_encoder_outputs", "--flip_aug", "--max_train_steps", "4"],
    "sdxl_dataset_name_diffusers_flags": ["--dataset_name", "{root}/hfdata", "--caption_column", "image_caption",
                                          "--num_train_epochs", "1", "--control_net_lr", "1e-3",
                                          "--gradient_checkpointing"],
}
# What each case is there for (tests/golden/README.md: what removing it does to the losses).
COVERS = {
    "sdxl_folders_te_cache_flip": SIZE_IDS_LOST,
    "sdxl_dataset_name_diffusers_flags": CAPTIONS_LOST,
}


@pytest.mark.numbers
@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, workspace):
    root = workspace
    extra = [a.replace("{root}", str(root)) for a in golden_case_args(case, CASES[case], COVERS)]
    argv = (base_args(root, f"golden_{case}") if "--dataset_name" in extra
            else folder_args(root, f"golden_{case}")) + extra
    run(argv)
    check_golden_losses("sdxl_controlnet_losses.json", case, logged_losses(root / f"golden_{case}" / "logs"))
    assert (root / f"golden_{case}" / "cn.safetensors").is_file()
    assert (root / f"golden_{case}" / "cn_diffusers" / "config.json").is_file()


def test_controlnet_and_unet_get_each_images_size_conditioning(workspace, monkeypatch):
    """Every step the ControlNet receives the text conditioning and the size/crop ids the U-Net receives, and the
    ids are each image's own (a 96x64 photo is not 'a 64x64 bucket image')."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    seen = {"controlnet": [], "unet": []}

    def recording(name, original):
        def forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
            seen[name].append((encoder_hidden_states.detach().float().clone(),
                               added_cond_kwargs["text_embeds"].detach().float().clone(),
                               added_cond_kwargs["time_ids"].detach().float().clone()))
            return original(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                            **kwargs)
        return forward

    monkeypatch.setattr(ControlNetModel, "forward", recording("controlnet", ControlNetModel.forward))
    monkeypatch.setattr(UNet2DConditionModel, "forward", recording("unet", UNet2DConditionModel.forward))
    run(folder_args(workspace, "size_ids") + ["--max_train_steps", "4", "--cache_text_encoder_outputs"])
    assert len(seen["controlnet"]) == len(seen["unet"]) == 4
    for ours, theirs in zip(seen["controlnet"], seen["unet"]):
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    original_sizes = {tuple(row[:2].int().tolist()) for _, _, ids in seen["controlnet"] for row in ids}
    assert (64, 96) in original_sizes or (96, 64) in original_sizes, original_sizes  # (height, width) of 96x64


def test_control_net_lr_is_kohyas_two_groups(workspace):
    """--control_net_lr (kohya's default 1e-4 here) trains the modules a ControlNet adds; the copied U-Net encoder
    trains at --learning_rate; both rates are logged."""
    from tests.test_sdxl_train_network import logged_scalars

    root = workspace
    run(folder_args(root, "lrs") + ["--max_train_steps", "2", "--learning_rate", "3e-5", "--lr_scheduler", "constant"])
    assert logged_scalars(root / "lrs" / "logs", "lr/controlnet") == pytest.approx([1e-4, 1e-4])
    assert logged_scalars(root / "lrs" / "logs", "lr/controlnet_encoder") == pytest.approx([3e-5, 3e-5])
    start = read_file(root / "lrs" / "cn.safetensors")
    assert any(start[k].abs().max() > 0 for k in start if k.startswith("controlnet_down_blocks."))


def test_resume_reproduces_the_uninterrupted_run(workspace):
    root = workspace
    extra = ["--max_train_steps", "5", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--flip_aug",
             "--cache_text_encoder_outputs", "--save_model_as", "safetensors"]
    run(folder_args(root, "full") + extra)
    run(folder_args(root, "part") + extra, stop_after=3)
    run(folder_args(root, "part") + extra + ["--resume_from_checkpoint", "latest"])
    a, b = read_file(root / "full" / "cn.safetensors"), read_file(root / "part" / "cn.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(root / "full" / "logs") == logged_losses(root / "part" / "logs")


@pytest.mark.numbers
def test_saved_controlnet_is_the_trained_one_in_diffusers_sdxl_pipeline(workspace):
    """Our diffusers folder and our single file (diffusers' names, read by diffusers' from_single_file) hold exactly
    the trained weights, and StableDiffusionXLControlNetPipeline gives the same images with either; the validation
    grid is the condition image beside the samples."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from library.model_loading import instantiate_models
    from library.samplers import make_scheduler
    from library.sd_checkpoint import read_checkpoint

    root = workspace
    run(folder_args(root, "export") + [
        "--max_train_steps", "2", "--save_state_on_train_end", "--validation_image", str(root / "cond" / "001.png"),
        "--validation_prompt", "a box", "--validation_steps", "2", "--num_validation_images", "1",
        "--validation_inference_steps", "2"])
    from_folder, from_file = saved_controlnets_hold_the_trained_weights(root / "export")

    with read_checkpoint(root / "sdxl.safetensors") as checkpoint:
        models = instantiate_models(checkpoint)
    condition = Image.open(root / "cond" / "001.png").convert("RGB").resize((64, 64))
    outputs = []
    for controlnet in (from_folder, from_file):
        pipe = StableDiffusionXLControlNetPipeline(
            vae=models.vae, text_encoder=models.text_encoders[0], text_encoder_2=models.text_encoders[1],
            tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1], unet=models.unet, controlnet=controlnet,
            scheduler=make_scheduler("ddim", "epsilon"), add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        outputs.append(pipe("a box", image=condition, num_inference_steps=2, width=64, height=64, output_type="np",
                            generator=torch.Generator().manual_seed(0)).images)
    assert_outputs_close(outputs[0], outputs[1], what="SDXL ControlNet from our folder vs our single file")
    (grid,) = (root / "export" / "validation").glob("cn_000002_00.png")
    assert Image.open(grid).size == (72 * 2, 48)  # the 96x64 condition image at the training area, then a sample
    assert np.asarray(Image.open(grid))[:, 72:].std() > 0


def test_wrong_family_and_controlnet_are_refused(workspace):
    root = workspace
    for script, model, hint in (("sdxl_train_control_net", "sd1.safetensors", "train_controlnet.py"),
                                ("train_controlnet", "sdxl.safetensors", "sdxl_train_control_net.py")):
        with pytest.raises(SystemExit) as info:
            run(folder_args(root, "refused", model) + ["--max_train_steps", "1"], script=script)
        assert hint in str(info.value.code) and model in str(info.value.code)
    # An SD 1.x ControlNet to continue from, on the SDXL base.
    run(folder_args(root, "sd1_cn", "sd1.safetensors") + ["--max_train_steps", "1", "--save_model_as", "safetensors"],
        script="train_controlnet")
    with pytest.raises(SystemExit) as info:
        run(folder_args(root, "refused") + ["--controlnet_model_name_or_path",
                                            str(root / "sd1_cn" / "cn.safetensors"), "--max_train_steps", "1"])
    assert "--controlnet_model_name_or_path" in str(info.value.code) and "SD 1.x" in str(info.value.code)
    # Captions that change per step cannot be cached.
    with pytest.raises(SystemExit) as info:
        run(folder_args(root, "refused") + ["--cache_text_encoder_outputs", "--shuffle_caption",
                                            "--max_train_steps", "1"])
    assert "--shuffle_caption" in str(info.value.code)


def test_continues_from_a_saved_controlnet(workspace):
    """--controlnet_model_name_or_path with our own single file (diffusers' names): training continues from exactly
    those weights (a 0-rate run saves them unchanged)."""
    root = workspace
    run(folder_args(root, "first") + ["--max_train_steps", "2", "--save_model_as", "safetensors"])
    run(folder_args(root, "second") + ["--max_train_steps", "1", "--save_model_as", "safetensors",
                                       "--controlnet_model_name_or_path", str(root / "first" / "cn.safetensors"),
                                       "--learning_rate", "0", "--control_net_lr", "0"])
    a, b = read_file(root / "first" / "cn.safetensors"), read_file(root / "second" / "cn.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fused_optimizer_groups_equal_the_normal_step(workspace):
    """kohya's --fused_optimizer_groups on the SDXL ControlNet with its two learning rates: the same weights and
    losses as the normal step, bit for bit (clipping off); with gradient accumulation it is refused by name."""
    root = workspace
    extra = ["--max_train_steps", "3", "--max_grad_norm", "0", "--save_model_as", "safetensors"]
    run(folder_args(root, "unfused") + extra)
    run(folder_args(root, "groups") + extra + ["--fused_optimizer_groups", "3"])
    a, b = read_file(root / "unfused" / "cn.safetensors"), read_file(root / "groups" / "cn.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(root / "unfused" / "logs") == logged_losses(root / "groups" / "logs")
    with pytest.raises(SystemExit, match="--fused_optimizer_groups does not work with --gradient_accumulation_steps"):
        run(folder_args(root, "refused") + extra + ["--fused_optimizer_groups", "3", "--gradient_accumulation_steps",
                                                    "2"])
