"""kohya's --torch_compile / --dynamo_backend (library/compilation.py) in every trainer and in the cache tools.

Compiling the tiny U-Net with inductor takes about 7 minutes on the 2-core machines, so the wiring is checked with
torch.compile recorded instead of run (which models each script compiles, with which arguments, accelerate launch's
--dynamo_* settings included, and that accelerate itself compiles nothing); one real trainer run compiles the U-Net and
the text encoder with dynamo's "eager" backend (graph capture through the LoRA and float8 layers, run by the same
kernels: bit-identical to the uncompiled run), and one small block is compiled for real by inductor (C++ code
generation) and compared with eager within a measured tolerance."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from library import train_args
from library import training_setup as setup
from tests.recipe_helpers import assert_same_training, run_script, tiny_workspace


@pytest.fixture
def compile_calls(monkeypatch):
    """torch.compile recorded, not run: (the compiled callable's owner, its keyword arguments); the module then runs
    uncompiled."""
    calls = []

    def record(fn=None, **kwargs):
        calls.append((getattr(fn, "__self__", fn), kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    return calls


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_compile")
    return tiny_workspace(root, images=4, folder="2_zwxq shape", prefix="zwxq shape, ",
                          companions={"edge_maps": root / "cond"})


def common(root: Path, out: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--resolution", "64", "--seed", "3", "--train_batch_size", "2",
            "--max_data_loader_n_workers", "0", "--logging_dir", str(root / out / "logs")]


def lora_args(root: Path, out: str) -> list[str]:
    return common(root, out) + ["--output_name", "lora", "--network_dim", "4", "--learning_rate", "1e-3"]


def compiled(calls) -> dict[type, dict]:
    return {type(owner): kwargs for owner, kwargs in calls}


# ------------------------------------------------------------------------------------------------ wiring


def test_each_script_compiles_the_models_it_runs(workspace, compile_calls):
    """Trainers: the U-Net and the text encoders (the ControlNet too), not the VAE; a cache tool: the model it runs
    (the VAE's encoder, or the text encoders); all with kohya's default backend, inductor."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.models.autoencoders.vae import Encoder
    from transformers import CLIPTextModel

    root = workspace
    trainer = {UNet2DConditionModel: {"backend": "inductor"}, CLIPTextModel: {"backend": "inductor"}}
    run_script("train_network", lora_args(root, "lora") + ["--max_train_steps", "1", "--torch_compile"])
    assert compiled(compile_calls) == trainer
    compile_calls.clear()
    run_script("train_textual_inversion", common(root, "ti") + ["--output_name", "emb", "--token_string", "zwxq",
                                                                "--max_train_steps", "1", "--torch_compile"])
    assert compiled(compile_calls) == trainer
    compile_calls.clear()
    run_script("train_db", common(root, "db") + ["--output_name", "db", "--max_train_steps", "1", "--torch_compile",
                                                 "--learning_rate", "1e-6"])
    assert compiled(compile_calls) == trainer
    compile_calls.clear()
    run_script("train_controlnet", common(root, "cn") + ["--output_name", "cn", "--conditioning_data_dir",
                                                         str(root / "cond"), "--max_train_steps", "1",
                                                         "--torch_compile", "--learning_rate", "1e-4"])
    assert compiled(compile_calls) == {**trainer, ControlNetModel: {"backend": "inductor"}}
    compile_calls.clear()
    from tools import cache_latents, cache_text_encoder_outputs

    cache_latents.cache(common(root, "tool")[:4] + ["--resolution", "64", "--torch_compile"])
    assert compiled(compile_calls) == {Encoder: {"backend": "inductor"}}
    compile_calls.clear()
    cache_text_encoder_outputs.cache(common(root, "tool")[:4] + ["--resolution", "64", "--torch_compile",
                                                                 "--dynamo_backend", "aot_eager"])
    assert compiled(compile_calls) == {CLIPTextModel: {"backend": "aot_eager"}}


def parsed(*flags: str):
    import train_network

    return train_args.parse_args(train_network.setup_parser(), ["--pretrained_model_name_or_path", "m",
                                                                "--output_dir", "o", *flags])


def test_accelerate_launch_settings_apply_and_accelerate_compiles_nothing(monkeypatch, compile_calls, caplog):
    """`accelerate launch --dynamo_mode / --dynamo_use_dynamic` reach torch.compile (through accelerate's own
    TorchDynamoPlugin, as in kohya); its --dynamo_backend alone compiles nothing (kohya: only --torch_compile does),
    with a warning saying so, and the Accelerator's own dynamo backend stays "no" (it would compile the wrapper of the
    whole step)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DynamoBackend

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "max-autotune")
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_DYNAMIC", "true")
    AcceleratorState._reset_state(reset_partial_state=True)
    with caplog.at_level(logging.WARNING):
        accelerator = setup.make_accelerator(parsed())
    assert accelerator.state.dynamo_plugin.backend == DynamoBackend.NO
    assert "accelerate launch --dynamo_backend inductor" in caplog.text and "add --torch_compile" in caplog.text
    settings = setup.compile_settings(parsed("--torch_compile", "--dynamo_backend", "eager"))
    module = torch.nn.Linear(2, 2)
    settings.apply(module, what="a layer")
    assert compile_calls == [(module, {"backend": "eager", "mode": "max-autotune", "dynamic": True})]
    AcceleratorState._reset_state(reset_partial_state=True)


def test_regional_compilation_compiles_repeated_blocks_in_place(monkeypatch, compile_calls):
    """accelerate launch --dynamo_use_regional_compilation: each block of a list of same-class blocks compiled once
    (the compiler's cache serves the others), in place: the U-Net object and its parameter names are unchanged."""
    from library.tiny_models import fresh_tiny_models

    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
    unet = fresh_tiny_models("sd1").unet
    names = [name for name, _ in unet.named_parameters()]
    setup.compile_settings(parsed("--torch_compile")).apply(unet, what="U-Net")
    owners = [owner for owner, _ in compile_calls]
    assert unet not in owners and unet.down_blocks[0].resnets[0] in owners and unet.down_blocks[0].resnets[1] in owners
    assert [name for name, _ in unet.named_parameters()] == names


@pytest.mark.parametrize("flags,needle", [
    (["--dynamo_backend", "eager"], "--dynamo_backend eager: only chooses --torch_compile's backend"),
    (["--torch_compile", "--dynamo_backend", "tvm"], "the tvm backend needs the tvm package"),
    (["--torch_compile", "--dynamo_backend", "fx2trt"], "has no backend 'fx2trt'; usable here: eager, aot_eager, "
                                                         "inductor"),
    (["--torch_compile", "--dynamo_backend", "tensort"], "kohya's misspelling of tensorrt"),
])
def test_backends_that_cannot_compile_are_refused_by_name(flags, needle):
    with pytest.raises(SystemExit) as info:
        train_args.check_training_flags(parsed(*flags))
    assert needle in str(info.value.code), info.value.code


def test_a_backend_outside_kohyas_list_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parsed("--torch_compile", "--dynamo_backend", "nvfuser")
    assert "--dynamo_backend: invalid choice: 'nvfuser'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real compiles


def test_a_compiled_lora_run_equals_the_uncompiled_one(workspace):
    """dynamo captures the U-Net and the text encoder with the LoRA and the float8 layers (--fp8_base's autograd
    functions) inside, and the "eager" backend runs the captured graphs with the same kernels: the losses and the
    LoRA are bit-identical (measured; a graph break or a wrong capture would change them)."""
    root = workspace
    extra = ["--max_train_steps", "2", "--fp8_base"]
    run_script("train_network", lora_args(root, "eager_run") + extra)
    run_script("train_network", lora_args(root, "compiled_run") + extra + ["--torch_compile", "--dynamo_backend",
                                                                           "eager"])
    assert_same_training(root, "eager_run", "compiled_run", "lora.safetensors")


class _Block(torch.nn.Module):
    """A U-Net-like piece: convolution, group norm, SiLU, attention-style linear; its forward is defined here, which
    dynamo compiles (it passes over modules whose code is all torch's own)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        return self.proj(h.flatten(2).transpose(1, 2))


# inductor generates its own fused C++ loops, which sum in another order than eager's kernels: measured on this
# block (AMD EPYC, default and ATEN_CPU_CAPABILITY=avx2 alike), loss equal and gradients 2.5e-7 apart relative to
# their largest value; 1e-5 allows for other CPUs' vector widths while a wrong kernel (a dropped term) is far off.
INDUCTOR_REL = 1e-5


def test_inductor_compiles_a_block_to_the_eager_numbers(tmp_path, monkeypatch):
    from library.compilation import CompileSettings

    # A cache of this test's own: inductor's shared one (/tmp/torchinductor_<user>) served kernels built for another
    # ATEN_CPU_CAPABILITY and gave numbers 10 % off (measured); and it would keep hundreds of MB.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    import torch._inductor.config

    # Precompiled headers go to the shared folder whatever the cache dir (150 MB): none (25 s -> 29 s here).
    monkeypatch.setattr(torch._inductor.config, "cpp_cache_precompile_headers", False)
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(2, 4, 8, 8)
    eager_loss = block(x).square().mean()
    eager_grads = torch.autograd.grad(eager_loss, list(block.parameters()))
    CompileSettings(backend="inductor").apply(block, what="block")
    loss = block(x).square().mean()
    grads = torch.autograd.grad(loss, list(block.parameters()))
    assert block._compiled_call_impl is not None
    assert abs(loss.item() - eager_loss.item()) <= INDUCTOR_REL * abs(eager_loss.item())
    for got, want in zip(grads, eager_grads):
        assert (got - want).abs().max() <= INDUCTOR_REL * want.abs().max()
