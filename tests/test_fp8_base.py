"""kohya's --fp8_base / --fp8_base_unet (library/fp8_weights.py): the frozen base model's Linear / Conv2d weights
stored in float8_e4m3fn and upcast per use. Checked: the stored weights take half the bytes of bf16; a layer's
outputs and input gradients are bit-identical to a layer whose weight was rounded to float8 and back, and autograd
keeps the float8 weight (not an upcast copy) for the backward pass; a LoRA trained with the flags is bit-identical
(weights and every logged loss) to one trained without them on a model file whose weights were rounded that way; and
what cannot work is refused by name."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from library.fp8_weights import FP8_DTYPE, Float8Conv2d, Float8Linear, store_in_float8
from library.safetensors_io import SafetensorsReader
from tests.recipe_helpers import assert_same_training, logged_losses, run_script, tiny_workspace


def rounded(weight: torch.Tensor) -> torch.Tensor:
    """The weight a float8-stored layer computes with (written here apart from the code under test)."""
    return weight.to(torch.float8_e4m3fn).to(weight.dtype)


class Small(nn.Module):
    """Convolutions (one strided) and linears, with and without bias, as the U-Net's blocks chain them."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(4, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.proj = nn.Linear(8, 16)
        self.out = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        h = self.down(torch.nn.functional.silu(self.first(x))).flatten(2).transpose(1, 2)
        return self.out(torch.nn.functional.gelu(self.proj(h)))


def _small(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return Small().to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, True), (torch.float32, True)],
                         ids=["fp32", "bf16_weights_autocast", "fp32_weights_autocast"])
def test_outputs_and_input_gradients_equal_a_rounded_model_bit_for_bit(dtype, autocast):
    base = _small(dtype)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for layer in (reference.down, reference.proj, reference.out):  # `first` holds the first parameter: kept
            layer.weight.copy_(rounded(layer.weight))
    stored = copy.deepcopy(base)
    report = store_in_float8(stored, dtype, what="model")
    assert (report.layers, report.kept) == (3, 1)
    assert type(stored.first) is nn.Conv2d and stored.first.weight.dtype == dtype
    assert isinstance(stored.down, Float8Conv2d) and isinstance(stored.proj, Float8Linear)
    assert all(layer.weight.dtype == FP8_DTYPE for layer in (stored.down, stored.proj, stored.out))
    results = []
    for model in (reference, stored):
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        y.float().square().sum().backward()
        results.append((y, x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_backward_keeps_the_float8_weights_not_upcast_copies():
    """What autograd saves for the backward pass: every weight it keeps is a float8 one (1 byte per value). With a
    plain upcast in the forward it would keep a compute-dtype copy of each weight until the backward pass."""
    model = _small(torch.bfloat16)
    store_in_float8(model, torch.bfloat16, what="model")
    weight_shapes = {tuple(m.weight.shape) for m in (model.down, model.proj, model.out)}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    kept_weights = [t for t in saved if tuple(t.shape) in weight_shapes]
    assert len(kept_weights) == 3 and all(t.dtype == FP8_DTYPE for t in kept_weights)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_unet_weights_take_half_the_bytes_of_bf16():
    """Parameter bytes of a tiny SD 1.x U-Net loaded in bf16, before and after: the stored Linear / Conv2d weights
    exactly halve; the whole U-Net goes to 0.52 of its bf16 bytes (measured: biases, norms and conv_in stay bf16),
    and still reports bf16 as its dtype (its first parameter, conv_in's weight), which pipelines cast inputs to."""
    from library.tiny_models import fresh_tiny_models

    unet = fresh_tiny_models("sd1").unet.to(torch.bfloat16).requires_grad_(False)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    layers = [m for m in unet.modules() if type(m) in (nn.Linear, nn.Conv2d) and m is not unet.conv_in]
    before_layers, before_all = nbytes(m.weight for m in layers), nbytes(unet.parameters())
    report = store_in_float8(unet, torch.bfloat16, what="U-Net")
    assert report.layers == len(layers) and report.kept == 1
    assert 2 * nbytes(m.weight for m in layers) == before_layers == 2 * report.weight_bytes
    ratio = nbytes(unet.parameters()) / before_all
    assert 0.5 < ratio < 0.53, ratio
    assert unet.dtype == torch.bfloat16


def test_refusals_name_the_layer():
    model = _small(torch.float32)
    with torch.no_grad():
        model.proj.weight[0, 0] = 1000.0
    with pytest.raises(ValueError, match=r"model proj: a weight of magnitude 1000 is beyond float8_e4m3fn's range"):
        store_in_float8(model, torch.float32, what="model")
    model = _small(torch.float32)
    model.out.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="model out: its weight trains"):
        store_in_float8(model, torch.float32, what="model")
    model = _small(torch.float32)
    model.proj.forward = lambda x: x  # as a LoRA's apply_to leaves a wrapped layer
    with pytest.raises(RuntimeError, match="model proj: an adapter already wraps this layer"):
        store_in_float8(model, torch.float32, what="model")


# ------------------------------------------------------------------------------------------------ the trainers


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_base")
    tiny_workspace(root, images=4, folder="2_zwxq shape", prefix="zwxq shape, ",
                   companions={"edge_maps": root / "cond"})
    write_rounded_model(root / "sd1.safetensors", root / "sd1_rounded_all.safetensors", text_encoders=True)
    write_rounded_model(root / "sd1.safetensors", root / "sd1_rounded_unet.safetensors", text_encoders=False)
    return root


def write_rounded_model(source: Path, dest: Path, *, text_encoders: bool, through: torch.dtype | None = None) -> None:
    """The base model with its U-Net's (and text encoders') Linear / Conv2d weights rounded to float8 and back, all
    but the U-Net's conv_in (the layer of its first parameter, which the flags keep). `through`: the weight dtype a
    run loads the model in (bf16 / fp16 mixed precision), which the flags round from: fp32 -> bf16 -> float8 is not
    always fp32 -> float8 (a bf16 value can land on a midpoint between two float8 values and then rounds to even)."""
    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.model_loading import checkpoint_from_models, instantiate_models
    from library.sd_checkpoint import read_checkpoint

    with read_checkpoint(source) as checkpoint:
        models = instantiate_models(checkpoint)
    rounded_models = [models.unet] + (list(models.text_encoders) if text_encoders else [])
    with torch.no_grad():
        for model in rounded_models:
            for module in model.modules():
                if type(module) in (nn.Linear, nn.Conv2d) and module is not models.unet.conv_in:
                    loaded = module.weight if through is None else module.weight.to(through)
                    module.weight.copy_(rounded(loaded))
    save_checkpoint(checkpoint_from_models(models), dest, SaveFormat.SAFETENSORS)


def lora_args(root: Path, out: str, model: str = "sd1.safetensors") -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "lora", "--resolution", "64", "--seed", "3",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--max_train_steps", "3",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--text_encoder_lr", "5e-3",
            "--logging_dir", str(root / out / "logs")]


def file_metadata(path: Path) -> dict[str, str]:
    with SafetensorsReader(path) as reader:
        return dict(reader.metadata)


@pytest.mark.parametrize("flag,rounded_model", [("--fp8_base", "sd1_rounded_all.safetensors"),
                                                ("--fp8_base_unet", "sd1_rounded_unet.safetensors")])
def test_a_lora_trains_exactly_as_on_the_rounded_model(workspace, flag, rounded_model):
    """U-Net and text-encoder LoRA, fp32 compute: the float8 run equals the run on the rounded file bit for bit."""
    root, name = workspace, flag[2:]
    run_script("train_network", lora_args(root, name) + [flag])
    run_script("train_network", lora_args(root, f"{name}_reference", rounded_model))
    assert_same_training(root, name, f"{name}_reference", "lora.safetensors")
    metadata = file_metadata(root / name / "lora.safetensors")
    if flag == "--fp8_base":  # and the rounding is not a no-op: the unrounded base trains another LoRA
        run_script("train_network", lora_args(root, "plain"))
        assert logged_losses(root / "plain" / "logs") != logged_losses(root / name / "logs")
    assert (metadata["ss_fp8_base"], metadata["ss_fp8_base_unet"]) == (str(flag == "--fp8_base"),
                                                                       str(flag == "--fp8_base_unet"))


def common(root: Path, out: str, model: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--resolution", "64", "--seed", "3", "--train_batch_size", "2",
            "--max_data_loader_n_workers", "0", "--max_train_steps", "2", "--logging_dir", str(root / out / "logs")]


def test_textual_inversion_trains_exactly_as_on_the_rounded_model(workspace):
    """The U-Net and the text encoder in float8; the new word's vectors (an embedding) keep their dtype."""
    root = workspace
    ti = ["--output_name", "emb", "--token_string", "zwxq", "--init_word", "shape", "--learning_rate", "5e-2",
          "--save_model_as", "safetensors"]
    run_script("train_textual_inversion", common(root, "ti_fp8", "sd1.safetensors") + ti + ["--fp8_base"])
    run_script("train_textual_inversion", common(root, "ti_reference", "sd1_rounded_all.safetensors") + ti)
    assert_same_training(root, "ti_fp8", "ti_reference", "emb.safetensors")


def test_controlnet_trains_exactly_as_on_the_rounded_model(workspace):
    """The frozen base (U-Net and text encoder) in float8, the ControlNet trained in its own dtype. Both runs start
    from the same ControlNet (made from the unrounded U-Net), since by default it is copied from the base."""
    from diffusers import ControlNetModel

    from library.model_loading import instantiate_component
    from library.sd_checkpoint import read_checkpoint

    root = workspace
    with read_checkpoint(root / "sd1.safetensors") as checkpoint:
        unet = instantiate_component(checkpoint, "unet", torch.float32)
    torch.manual_seed(0)
    ControlNetModel.from_unet(unet).save_pretrained(root / "cn_start")
    cn = ["--output_name", "cn", "--conditioning_data_dir", str(root / "cond"), "--learning_rate", "1e-3",
          "--controlnet_model_name_or_path", str(root / "cn_start")]
    run_script("train_controlnet", common(root, "cn_fp8", "sd1.safetensors") + cn + ["--fp8_base"])
    run_script("train_controlnet", common(root, "cn_reference", "sd1_rounded_all.safetensors") + cn)
    assert_same_training(root, "cn_fp8", "cn_reference", "cn.safetensors")


@pytest.mark.parametrize("script", ["train_db", "fine_tune", "sdxl_train"])
def test_the_full_model_trainers_refuse_it_by_name(workspace, script):
    with pytest.raises(SystemExit) as info:
        run_script(script, common(workspace, "refused", "sd1.safetensors") + ["--fp8_base"])
    assert "--fp8_base: this trainer trains the U-Net itself" in str(info.value.code)
