"""Every precision mode a user can pick on this machine, for every part a trainer can train.

Before this file, the only half-precision LoRA run was `--full_bf16` (where the LoRA is bf16 like the frozen model);
the README's own command, `--mixed_precision bf16` with fp32 LoRA weights and the text-encoder LoRA on (the
default), crashed at its first step and no test ran it. Here each (mode, trained part) pair trains a few steps with
sample images (inference outside the training autocast) and checks what the mode promises: finite losses, the
parts asked for (and only those) changed, the trained weights in the promised dtype, and a first-step loss that
equals the fp32 one within half-precision rounding. fp16 needs CUDA; on CPU it is refused (tested in
test_train_network_bad_inputs.py and test_precision.py).
"""

from __future__ import annotations

import re

import pytest
import torch

from library.safetensors_io import SafetensorsReader
from tests.recipe_helpers import logged_losses, run_script, tiny_workspace

MODES = {
    "fp32": ["--mixed_precision", "no"],
    "bf16": ["--mixed_precision", "bf16"],
    "full_bf16": ["--mixed_precision", "bf16", "--full_bf16"],
}
PARTS = {
    "unet_and_te": [],
    "unet_only": ["--network_train_unet_only"],
    "te_only": ["--network_train_text_encoder_only"],
}
# The first step's loss is computed before any update, so the modes differ only by the forward pass's rounding
# (bf16 autocast: matmuls in bf16, 8 mantissa bits; train_db / fine_tune also encode the images with a bf16 VAE).
# Measured |bf16 - fp32| / fp32 on these tiny models: LoRA 1.5e-5 (AMD EPYC native, ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2) to 1.7e-4 (ATEN_CPU_CAPABILITY=default); train_db / fine_tune up to 1.1e-3 (default).
# 5e-3 is 4.5x the largest. It catches broken precision handling (a wrong cast, a NaN, garbage latents), not subtle
# conditioning errors: on a random tiny model --clip_skip 2 moves this loss by 1.1e-2, an empty caption by only
# 1.9e-3 (the golden-loss tests guard those, in fp32).
FIRST_LOSS_REL = 5e-3
# At 64 px the mid block's feature map is 1x1: its self-attention sees one token, the softmax is 1 whatever q and k
# are, so their LoRAs get no gradient (exactly 0 in bf16; fp32's SDPA leaves rounding noise).
SINGLE_TOKEN_QK = re.compile(r"mid_block_attentions_0_transformer_blocks_0_attn1_to_[qk]\.")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tiny_workspace(tmp_path_factory.mktemp("precision_modes"), images=4, folder="2_sks shape")
    (root / "prompts.txt").write_text("sks shape, red circle --w 64 --h 64 --s 2 --d 1\n")
    return root


def train(root, name: str, extra: list[str]) -> dict[str, torch.Tensor]:
    out = root / name
    run_script("train_network", [
        "--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
        "--output_dir", str(out), "--output_name", "lora", "--resolution", "64", "--network_dim", "4",
        "--learning_rate", "1e-2", "--seed", "3", "--train_batch_size", "2", "--max_train_steps", "2",
        "--max_data_loader_n_workers", "0", "--logging_dir", str(out / "logs"),
        "--sample_prompts", str(root / "prompts.txt"), "--sample_every_n_steps", "2", *extra])
    with SafetensorsReader(out / "lora.safetensors") as reader:
        return {k: reader.read(k) for k in reader.keys()}


@pytest.mark.numbers
@pytest.mark.parametrize("part", list(PARTS))
@pytest.mark.parametrize("mode", list(MODES))
def test_lora_trains_in_every_precision_mode(mode, part, workspace):
    root = workspace
    name = f"{mode}_{part}"
    weights = train(root, name, MODES[mode] + PARTS[part])
    losses = logged_losses(root / name / "logs")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert len(list((root / name / "sample").glob("*.png"))) == 1

    trained_dtype = torch.bfloat16 if mode == "full_bf16" else torch.float32
    for prefix, wanted in (("lora_unet_", part != "te_only"), ("lora_te_", part != "unet_only")):
        ups = [v for k, v in weights.items() if k.startswith(prefix) and k.endswith("lora_up.weight")
               and not SINGLE_TOKEN_QK.search(k)]
        assert bool(ups) == wanted, prefix
        # lora_up starts at zero: after two steps every trained module's must have moved.
        assert all(u.dtype == trained_dtype and torch.isfinite(u).all() and u.abs().max() > 0 for u in ups), prefix

    if mode != "fp32":
        reference = root / f"fp32_{part}" / "logs"
        if not reference.exists():
            train(root, f"fp32_{part}", MODES["fp32"] + PARTS[part])
        assert losses[0] == pytest.approx(logged_losses(reference)[0], rel=FIRST_LOSS_REL)


# The other trainers in bf16 with what they train in fp32 beside bf16 frozen parts (train_db / fine_tune: the
# U-Net and text encoder; textual inversion: the new words; ControlNet: the ControlNet), each with its sample or
# validation images (drawn outside the training autocast, from models of mixed dtypes).
OTHER_TRAINERS = {
    "train_db": ["--stop_text_encoder_training", "1", "--sample_prompts", "{root}/prompts.txt",
                 "--sample_every_n_steps", "2"],
    "fine_tune": ["--train_text_encoder", "--sample_prompts", "{root}/prompts.txt", "--sample_every_n_steps", "2"],
    "train_textual_inversion": ["--token_string", "newtok", "--init_word", "shape", "--use_object_template",
                                "--sample_prompts", "{root}/prompts.txt", "--sample_every_n_steps", "2"],
    "train_controlnet": ["--conditioning_data_dir", "{root}/data/2_sks shape", "--validation_image",
                         "{root}/data/2_sks shape/000.png", "--validation_prompt", "sks shape",
                         "--validation_steps", "2", "--num_validation_images", "1"],
}


def train_other(root, script: str, mode: str) -> list[float]:
    out = root / f"{script}_{mode}"
    extra = [a.replace("{root}", str(root)) for a in OTHER_TRAINERS[script]]
    run_script(script, [
        "--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
        "--output_dir", str(out), "--output_name", "out", "--resolution", "64", "--learning_rate", "1e-4",
        "--seed", "3", "--train_batch_size", "2", "--max_train_steps", "2", "--max_data_loader_n_workers", "0",
        "--logging_dir", str(out / "logs"), *MODES[mode], *extra])
    images = list(out.glob("sample/*.png")) + list(out.glob("validation/*.png"))
    assert len(images) == 1, script
    return logged_losses(out / "logs")


@pytest.mark.numbers
@pytest.mark.parametrize("script", list(OTHER_TRAINERS))
def test_other_trainers_train_and_sample_in_bf16(script, workspace):
    losses = train_other(workspace, script, "bf16")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(train_other(workspace, script, "fp32")[0], rel=FIRST_LOSS_REL)
