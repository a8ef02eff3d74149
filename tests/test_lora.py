"""networks.lora: kohya names and counts, exact apply/restore, merge == apply, file round trips, diffusers as an
independent reader of our files, and training-time dropouts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import FAMILIES
from library.model_loading import checkpoint_from_models
from library.safetensors_io import SafetensorsReader, save_tensors
from library.tiny_models import build_tiny_models
from networks import lora
from networks.lora import LoRAModule, create_network, create_network_from_weights
from tests.numerics import assert_outputs_close

TE_NAME = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
LOCON = {"conv_dim": "4", "conv_alpha": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine two OpenMP threads made each tiny
    U-Net forward take ~2 s instead of ~20 ms (one thread waiting for a descheduled other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family: str = "sd1"):
    return build_tiny_models(FAMILIES[family])  # same seed -> bit-identical weights on every call


def randomise_up(network, seed: int = 0, std: float = 0.1) -> None:
    """Fresh LoRAs are zero (lora_up = 0); give them something to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * std)


def te_input(models):
    return models.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids


@torch.no_grad()
def te_output(models, text_encoder=None):
    return (text_encoder if text_encoder is not None else models.text_encoder)(te_input(models)).last_hidden_state


@torch.no_grad()
def outputs(models, unet=None, text_encoder=None):
    """(text-encoder output, U-Net output) on fixed inputs; `unet` / `text_encoder` override the models'."""
    unet = unet if unet is not None else models.unet
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)  # U-Net alone
    return te_output(models, text_encoder), unet(latents, 500, context).sample


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------ 1. names


def test_names_follow_kohya_and_diffusers_paths(tmp_path):
    models = tiny()
    network = create_network(1.0, 4, 2, None, models.text_encoder, models.unet, **LOCON)
    names = {m.lora_name for m in network.loras}
    for expected in (TE_NAME, "lora_te_text_model_encoder_layers_1_mlp_fc2",
                     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                     "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
                     "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
                     "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1",
                     "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
                     "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                     "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv"):
        assert expected in names
    # Every U-Net name is "lora_unet_" + the wrapped module's diffusers path; every TE name has text_model.
    paths = {id(m): p for p, m in models.unet.named_modules()}
    for module in network.unet_loras:
        assert module.lora_name == "lora_unet_" + paths[id(module.org_module)].replace(".", "_")
    te_paths = {id(m): p for p, m in models.text_encoder.named_modules()}
    for module in network.text_encoder_loras:
        assert module.lora_name == "lora_te_text_model_" + te_paths[id(module.org_module)].replace(".", "_")

    network.save_weights(tmp_path / "lora.safetensors", None, None)
    with SafetensorsReader(tmp_path / "lora.safetensors") as reader:
        tensors = {k: reader.read(k) for k in reader.keys()}
    assert len(tensors) == 3 * len(network.loras)
    for key in tensors:
        assert key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")), key
    for module in network.loras:
        org, name = module.org_module, module.lora_name
        down, up, alpha = (tensors[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert alpha.shape == () and alpha.dtype == torch.float32
        if isinstance(org, nn.Linear):
            assert down.shape == (4, org.in_features) and up.shape == (org.out_features, 4)
        else:
            assert down.shape == (4, org.in_channels, *org.kernel_size) and up.shape == (org.out_channels, 4, 1, 1)
        # network_dim/alpha for Linear and 1x1, conv_dim/alpha for 3x3 (both 4 here; alphas tell them apart)
        is_kxk = isinstance(org, nn.Conv2d) and org.kernel_size != (1, 1)
        assert alpha.item() == (1.0 if is_kxk else 2.0), name


def test_text_encoder_names_include_text_model_for_transformers_4_and_5():
    """transformers 5's CLIPTextModel has no `text_model.` level, 4's has; the file names must be the same."""
    models = tiny()

    class Transformers4Layout(nn.Module):  # CLIPTextModel as transformers 4 nested it
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner

    assert not hasattr(models.text_encoder, "text_model")
    names5 = [m.lora_name for m in create_network(1.0, 4, 1, None, models.text_encoder, None).loras]
    nested = Transformers4Layout(models.text_encoder)
    names4 = [m.lora_name for m in create_network(1.0, 4, 1, None, nested, None).loras]
    assert TE_NAME in names5 and names5 == names4
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in names5)


# ------------------------------------------------------------------------------------------ 2. golden counts

# (text encoder, U-Net attention-only, U-Net with LoCon, of which 3x3 convs). SD 1.5: 12 CLIP layers x 6 = 72;
# 16 Transformer2DModels x 12 = 192. SD 2.x: diffusers keeps 23 of OpenCLIP's 24 layers -> 138. LoCon adds
# 22 ResNet blocks x (conv1, conv2, time_emb_proj) + 14 conv_shortcuts + 3 down- + 3 upsamplers = 86 -> 278.
GOLDEN_COUNTS = {"sd1": (72, 192, 278, 50), "sd2-512": (138, 192, 278, 50), "sd2-768-v": (138, 192, 278, 50)}


@pytest.mark.parametrize("family_name", list(GOLDEN_COUNTS))
def test_golden_module_counts_on_full_size_configs(family_name):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = FAMILIES[family_name].configs()
    with torch.device("meta"):  # full-size structure without allocating its weights
        unet = UNet2DConditionModel.from_config(configs.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs.of("text_encoder")))
    te, attention, locon, kxk = GOLDEN_COUNTS[family_name]
    network = create_network(1.0, 8, 1, None, text_encoder, unet)
    assert (len(network.text_encoder_loras), len(network.unet_loras)) == (te, attention)
    network = create_network(1.0, 8, 1, None, text_encoder, unet, conv_dim="4")
    assert len(network.unet_loras) == locon
    ranks = [m.lora_dim for m in network.unet_loras]
    assert ranks.count(4) == kxk and ranks.count(8) == locon - kxk


# ------------------------------------------------------------------------------- 3. zero init, apply, restore


@pytest.mark.parametrize("network_args", [{}, LOCON], ids=["attention", "locon"])
def test_fresh_network_is_a_no_op_and_restore_is_exact(network_args):
    models = tiny()
    reference = outputs(models)
    network = create_network(1.0, 4, 2, None, models.text_encoder, models.unet, **network_args)
    network.apply_to(models.text_encoder, models.unet)
    for got, want in zip(outputs(models), reference):
        assert torch.equal(got, want)  # lora_up starts at zero
    randomise_up(network)
    for got, want in zip(outputs(models), reference):
        assert max_diff(got, want) > 1e-3
    network.restore()
    for got, want in zip(outputs(models), reference):
        assert torch.equal(got, want)
    assert all("forward" not in m.org_module.__dict__ for m in network.loras)
    network.apply_to(models.text_encoder, models.unet)  # can be applied again
    assert max_diff(outputs(models)[1], reference[1]) > 1e-3
    network.remove_from(models.text_encoder, models.unet)
    assert torch.equal(outputs(models)[1], reference[1])


def test_apply_to_a_part_discards_the_other_part():
    models = tiny()
    network = create_network(1.0, 4, 1, None, models.text_encoder, models.unet)
    network.apply_to(models.text_encoder, models.unet, apply_text_encoder=False)
    assert not network.text_encoder_loras and not any(k.startswith("lora_te") for k in network.state_dict())
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-3)
    assert descriptions == ["unet"] and groups[0]["lr"] == 1e-4
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in network.parameters())
    with pytest.raises(ValueError, match="another text encoder"):
        network.apply_to(tiny().text_encoder, None)


def test_optimizer_groups():
    models = tiny()
    network = create_network(1.0, 4, 1, None, models.text_encoder, models.unet)
    with pytest.raises(RuntimeError, match="apply_to"):
        network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    network.apply_to(models.text_encoder, models.unet)
    groups, descriptions = network.prepare_optimizer_params(None, None, 1e-3)
    assert descriptions == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-3, 1e-3]
    groups, descriptions = network.prepare_optimizer_params(0, 1e-4, 1e-3)  # --text_encoder_lr 0: TE frozen
    assert descriptions == ["unet"]
    assert not any(p.requires_grad for m in network.text_encoder_loras for p in m.parameters())
    assert network.is_mergeable() and list(network.get_trainable_params())


# ------------------------------------------------------------------------------------------ 4. merge == apply


@pytest.mark.numbers
@pytest.mark.parametrize("network_args", [{}, LOCON], ids=["attention", "locon"])
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_merge_equals_apply(network_args, multiplier):
    applied_models, merged_models = tiny(), tiny()
    network = create_network(multiplier, 4, 2, None, applied_models.text_encoder, applied_models.unet,
                             **network_args)
    randomise_up(network)
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    network.apply_to(applied_models.text_encoder, applied_models.unet)
    applied = outputs(applied_models)

    # kohya's --base_weights path: a network shaped by the file, merged from the file's tensors.
    merger, _ = create_network_from_weights(multiplier, None, None, merged_models.text_encoder,
                                            merged_models.unet, weights_sd=weights, for_inference=True)
    merger.merge_to(merged_models.text_encoder, merged_models.unet, weights, dtype=torch.float32)
    for got, want in zip(outputs(merged_models), applied):
        assert_outputs_close(got, want, what="merged vs applied")
    # Base weights changed, base keys did not.
    assert merged_models.unet.state_dict().keys() == tiny().unet.state_dict().keys()


@pytest.mark.numbers
def test_merge_own_weights_and_refuse_double_counting():
    applied_models, merged_models = tiny(), tiny()
    applied_net = create_network(1.0, 4, 2, None, applied_models.text_encoder, applied_models.unet, **LOCON)
    merged_net = create_network(1.0, 4, 2, None, merged_models.text_encoder, merged_models.unet, **LOCON)
    randomise_up(applied_net)
    merged_net.load_state_dict(applied_net.state_dict())
    applied_net.apply_to(applied_models.text_encoder, applied_models.unet)
    with pytest.raises(RuntimeError, match="restore"):
        applied_net.merge_to(applied_models.text_encoder, applied_models.unet)
    merged_net.merge_to(merged_models.text_encoder, merged_models.unet)
    for got, want in zip(outputs(merged_models), outputs(applied_models)):
        assert_outputs_close(got, want, what="merge_to vs apply_to")


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_conv_delta_is_the_composed_kernel(kernel, stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, kernel, stride, padding)
    module = LoRAModule("x", conv, lora_dim=3, alpha=1.5)
    nn.init.normal_(module.lora_up.weight)
    x = torch.randn(2, 6, 9, 9)
    expected = module.lora_up(module.lora_down(x)) * module.scale
    got = nn.functional.conv2d(x, module.merged_weight_delta(), None, stride, padding)
    assert max_diff(got, expected) <= 1e-5


# -------------------------------------------------------------------------------------- 5. files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_load_round_trip_is_bit_exact(tmp_path, suffix):
    models = tiny()
    network = create_network(1.0, 4, 2, None, models.text_encoder, models.unet, **LOCON)
    randomise_up(network)
    path = tmp_path / f"lora{suffix}"
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0"}
    network.save_weights(path, None, metadata)
    if suffix == ".safetensors":
        with SafetensorsReader(path) as reader:
            assert reader.metadata == metadata
    torch.manual_seed(123)  # another random lora_down init
    other = create_network(1.0, 4, 2, None, models.text_encoder, models.unet, **LOCON)
    info = other.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    saved, loaded = network.state_dict(), other.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert not list(tmp_path.glob(".*"))  # no temporary files left beside it

    network.save_weights(tmp_path / f"half{suffix}", torch.float16, None)
    half = lora.read_weights(tmp_path / f"half{suffix}")
    assert all(v.dtype == torch.float16 for v in half.values())


def test_create_network_from_weights_rebuilds_mixed_ranks_and_alphas(tmp_path):
    models = tiny()
    network = create_network(1.0, 4, 2, None, models.text_encoder, models.unet, conv_dim="2", conv_alpha="1")
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    # A file as resize_lora.py --dynamic_method writes it: one module at another rank and alpha, and one from
    # an old trainer without an alpha (alpha = rank then).
    wide = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    weights[f"{wide}.lora_down.weight"] = torch.randn(8, weights[f"{wide}.lora_down.weight"].shape[1])
    weights[f"{wide}.lora_up.weight"] = torch.randn(weights[f"{wide}.lora_up.weight"].shape[0], 8)
    weights[f"{wide}.alpha"] = torch.tensor(5.0)
    del weights[f"{TE_NAME}.alpha"]
    del weights["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight"]  # a module the file lacks
    del weights["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight"]
    del weights["lora_te_text_model_encoder_layers_1_mlp_fc1.alpha"]
    save_tensors(tmp_path / "mixed.safetensors", weights)

    rebuilt, weights_sd = create_network_from_weights(1.0, str(tmp_path / "mixed.safetensors"), None,
                                                      models.text_encoder, models.unet)
    by_name = {m.lora_name: m for m in rebuilt.loras}
    assert set(weights_sd) == set(weights)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1" not in by_name
    assert len(by_name) == len(network.loras) - 1
    assert (by_name[wide].lora_dim, by_name[wide].alpha.item(), by_name[wide].scale) == (8, 5.0, 5.0 / 8)
    assert (by_name[TE_NAME].lora_dim, by_name[TE_NAME].alpha.item()) == (4, 4.0)
    for module in network.loras:
        if module.lora_name in by_name and module.lora_name not in (wide, TE_NAME):
            twin = by_name[module.lora_name]
            assert (twin.lora_dim, twin.alpha.item()) == (module.lora_dim, module.alpha.item())
    info = rebuilt.load_weights(tmp_path / "mixed.safetensors")
    assert info.missing_keys == [f"{TE_NAME}.alpha"]  # kept at alpha = rank, as kohya does
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in weights.items())


def test_load_errors_name_the_offending_keys(tmp_path):
    models = tiny()
    network = create_network(1.0, 4, 1, None, models.text_encoder, models.unet)
    weights = dict(network.state_dict())
    bad_shape = dict(weights, **{f"{TE_NAME}.lora_down.weight": torch.zeros(8, 32)})
    save_tensors(tmp_path / "shape.safetensors", bad_shape)
    with pytest.raises(ValueError, match=rf"{TE_NAME}\.lora_down\.weight: \(8, 32\)"):
        network.load_weights(tmp_path / "shape.safetensors")
    unknown = dict(weights, **{"lora_unet_conv_in.alpha": torch.tensor(1.0)})
    save_tensors(tmp_path / "unknown.safetensors", unknown)
    with pytest.raises(ValueError, match="unexpected key.*lora_unet_conv_in.alpha"):
        network.load_weights(tmp_path / "unknown.safetensors")
    missing = {k: v for k, v in weights.items() if not k.startswith(TE_NAME)}
    save_tensors(tmp_path / "missing.safetensors", missing)
    info = network.load_weights(tmp_path / "missing.safetensors")
    assert sorted(info.missing_keys) == sorted(k for k in weights if k.startswith(TE_NAME))

    lycoris = dict(weights, **{f"{TE_NAME}.hada_w1_a": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="hada_w1_a"):
        create_network_from_weights(1.0, None, None, models.text_encoder, models.unet, weights_sd=lycoris)
    sdxl_names = dict(weights, **{"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 4),
                                  "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="lora_unet_input_blocks_4_1_proj_in"):
        create_network_from_weights(1.0, None, None, models.text_encoder, models.unet, weights_sd=sdxl_names)


def test_network_args_parsing():
    models = tiny()
    network = create_network(1.0, None, None, None, [models.text_encoder], models.unet, conv_dim="2",
                             rank_dropout="0.1", module_dropout="0.2", dropout="0.3")
    conv = next(m for m in network.unet_loras if m.lora_name.endswith("resnets_0_conv1"))
    attention = network.unet_loras[0]
    assert (conv.lora_dim, conv.alpha.item()) == (2, 1.0)  # kohya's conv_alpha default
    assert (attention.lora_dim, attention.alpha.item()) == (4, 1.0)  # kohya's network_dim/alpha defaults
    assert (attention.rank_dropout, attention.module_dropout, attention.dropout) == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match="algo, preset"):
        create_network(1.0, 4, 1, None, models.text_encoder, models.unet, algo="lora", preset="full")
    with pytest.raises(ValueError, match="conv_dim='four'"):
        create_network(1.0, 4, 1, None, models.text_encoder, models.unet, conv_dim="four")
    with pytest.raises(ValueError, match="rank_dropout"):
        create_network(1.0, 4, 1, None, models.text_encoder, models.unet, rank_dropout="1.5")
    with pytest.raises(ValueError, match="conflicts"):
        create_network(1.0, 4, 1, None, models.text_encoder, models.unet, neuron_dropout=0.1, dropout="0.2")
    with pytest.raises(ValueError, match="given twice"):  # a list is SDXL's encoders, each once
        create_network(1.0, 4, 1, None, [models.text_encoder] * 2, models.unet)


# -------------------------------------------------------------------- 6. diffusers as an independent reader


def diffusers_pipe_with_lora(models, folder, lora_file):
    from diffusers import StableDiffusionPipeline

    save_checkpoint(checkpoint_from_models(models), folder, SaveFormat.DIFFUSERS_SAFETENSORS)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    return pipe


@pytest.mark.numbers
@pytest.mark.parametrize("family_name", ["sd1", "sd2-768-v"])
@pytest.mark.parametrize("network_args", [{}, LOCON], ids=["attention", "locon"])
def test_diffusers_loads_our_file_to_the_same_outputs(tmp_path, family_name, network_args):
    """dim 4 / alpha 2 (scale 0.5), LoCon 3x3 at alpha 1 (scale 0.25): our applied network and diffusers+PEFT
    reading our file compute the same U-Net and text-encoder outputs."""
    models = tiny(family_name)
    reference = outputs(models)
    network = create_network(1.0, 4, 2, None, models.text_encoder, models.unet, **network_args)
    randomise_up(network)
    network.save_weights(tmp_path / "lora.safetensors", None, {"ss_network_dim": "4"})
    pipe = diffusers_pipe_with_lora(models, tmp_path / "pipe", tmp_path / "lora.safetensors")
    network.apply_to(models.text_encoder, models.unet)
    ours, theirs = outputs(models), outputs(models, unet=pipe.unet, text_encoder=pipe.text_encoder)
    for got, want, base in zip(theirs, ours, reference):
        assert max_diff(want, base) > 1e-2  # the LoRA matters...
        assert_outputs_close(got, want, what="diffusers + PEFT vs ours")  # ...and diffusers applies it as we do


@pytest.mark.numbers
def test_diffusers_reads_a_mixed_rank_file_like_we_do(tmp_path):
    """Per-module ranks (as resize_lora.py writes) with one alpha per file: diffusers' rank_pattern handles it."""
    models = tiny()
    network = create_network(1.0, 4, 2, None, models.text_encoder, models.unet, conv_dim="4", conv_alpha="2")
    randomise_up(network)
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    generator = torch.Generator().manual_seed(3)
    for name in (TE_NAME, "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_unet_down_blocks_0_resnets_0_conv1",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"):
        down, up = weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"]
        weights[f"{name}.lora_down.weight"] = torch.randn(8, *down.shape[1:], generator=generator) * 0.1
        weights[f"{name}.lora_up.weight"] = torch.randn(up.shape[0], 8, *up.shape[2:], generator=generator) * 0.1
    save_tensors(tmp_path / "mixed.safetensors", weights)
    rebuilt, _ = create_network_from_weights(1.0, tmp_path / "mixed.safetensors", None, models.text_encoder,
                                             models.unet)
    rebuilt.load_weights(tmp_path / "mixed.safetensors")
    pipe = diffusers_pipe_with_lora(models, tmp_path / "pipe", tmp_path / "mixed.safetensors")
    rebuilt.apply_to(models.text_encoder, models.unet)
    for got, want in zip(outputs(models, unet=pipe.unet, text_encoder=pipe.text_encoder), outputs(models)):
        assert_outputs_close(got, want, what="mixed ranks: diffusers vs ours")


@pytest.mark.numbers
@pytest.mark.xfail(strict=False, reason="diffusers' kohya converter names the alpha of attention (to_q/k/v/out) and "
                   "text-encoder modules so that PEFT's alpha_pattern never matches (PEFT warns 'alpha_pattern keys "
                   "did not match'): a module whose alpha differs from the file's most common alpha gets the most "
                   "common one. ff, proj_in/out, ResNet and sampler modules are fine.")
def test_diffusers_heterogeneous_attention_alphas(tmp_path):
    models = tiny()
    network = create_network(1.0, 4, 2, None, models.text_encoder, models.unet)
    randomise_up(network)
    state = network.state_dict()
    state[f"{TE_NAME}.alpha"] = torch.tensor(3.0)
    state["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"] = torch.tensor(3.0)
    network.load_state_dict(state)
    network.save_weights(tmp_path / "lora.safetensors", None, None)
    pipe = diffusers_pipe_with_lora(models, tmp_path / "pipe", tmp_path / "lora.safetensors")
    network.apply_to(models.text_encoder, models.unet)
    for got, want in zip(outputs(models, unet=pipe.unet, text_encoder=pipe.text_encoder), outputs(models)):
        assert_outputs_close(got, want, what="heterogeneous alphas (a real defect of diffusers' converter)")


# ------------------------------------------------------------------------------------------ 7. dropouts


@pytest.mark.parametrize("kind", ["dropout", "rank_dropout", "module_dropout"])
def test_dropouts_act_only_in_training_and_are_seeded(kind):
    models = tiny()
    plain = create_network(1.0, 4, 2, None, models.text_encoder, None)
    randomise_up(plain)
    plain.apply_to(models.text_encoder, None)
    expected = te_output(models)
    plain.restore()

    network = create_network(1.0, 4, 2, None, models.text_encoder, None, **{kind: "0.5"})
    network.load_state_dict(plain.state_dict())
    network.apply_to(models.text_encoder, None)
    network.eval()
    assert torch.equal(te_output(models), expected)
    network.on_epoch_start(models.text_encoder, models.unet)  # kohya's hook: .train()
    assert network.training
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(te_output(models))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert max_diff(runs[0], expected) > 1e-3


@pytest.mark.parametrize("kind", ["dropout", "rank_dropout"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_dropouts_keep_the_expected_update(kind, layer):
    """Dropped ranks / units are compensated by 1/(1-p): averaged over many masks, the update is unchanged."""
    torch.manual_seed(0)
    org = nn.Linear(8, 8) if layer == "linear" else nn.Conv2d(8, 8, 3, 1, 1)
    module = LoRAModule("x", org, lora_dim=16, alpha=4, **{kind: 0.5})
    nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    x = torch.randn(1, 8) if layer == "linear" else torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        base = org.__class__.forward(org, x)
        module.eval()
        exact = org(x) - base
        module.train()
        batch = x.expand(20000, *x.shape[1:])
        averaged = (org(batch) - base).mean(0, keepdim=True)
    relative = max_diff(averaged, exact) / exact.abs().max().item()
    assert relative < 0.05
    assert not math.isclose(relative, 0.0)  # it did drop something


# ----------------------------------------------------------------------------------------------------------
# Block-wise ranks / learning rates and LoRA+ (kohya's --network_args)


def test_unet_block_indices_follow_kohya():
    from networks.lora_blocks import unet_block_index

    cases = {"lora_unet_down_blocks_0_attentions_0_proj_in": 1, "lora_unet_down_blocks_0_resnets_1_conv1": 2,
             "lora_unet_down_blocks_0_downsamplers_0_conv": 3, "lora_unet_down_blocks_3_resnets_1_conv2": 11,
             "lora_unet_mid_block_attentions_0_proj_out": 12, "lora_unet_up_blocks_0_resnets_0_conv1": 13,
             "lora_unet_up_blocks_0_upsamplers_0_conv": 15, "lora_unet_up_blocks_3_attentions_2_proj_out": 24,
             "lora_unet_conv_in": -1}
    assert {name: unet_block_index(name) for name in cases} == cases


def test_block_dims_lr_weights_and_loraplus():
    from library.families import SD1
    from library.tiny_models import build_tiny_models
    from networks.lora import create_network
    from networks.lora_blocks import unet_block_index

    m = build_tiny_models(SD1, seed=9)
    dims = ",".join(str(d) for d in [0] + [2] * 11 + [3] + [4] * 12)
    network = create_network(1.0, 8, 8, None, m.text_encoder, m.unet, block_dims=dims,
                             down_lr_weight="zeros", loraplus_lr_ratio="16")
    network.apply_to(m.text_encoder, m.unet)
    by_block = {unet_block_index(l.lora_name): l.lora_dim for l in network.unet_loras}
    # Down blocks have lr weight 0: kohya then creates no module there.
    # (Attention LoRA lives in down blocks 1-8, mid 12 and up blocks 16-24: up_blocks.0 has no attention.)
    assert not any(1 <= b <= 11 for b in by_block) and by_block[12] == 3 and by_block[16] == 4
    assert all(l.lora_dim == 8 for l in network.text_encoder_loras)  # the text encoder is not block-wise
    groups, names = network.prepare_optimizer_params(1e-5, 1e-4, 1e-4)
    lrs = dict(zip(names, (g["lr"] for g in groups)))
    assert lrs["textencoder"] == 1e-5 and lrs["textencoder plus"] == pytest.approx(1.6e-4)
    assert lrs["unet_block12"] == 1e-4 and lrs["unet_block12 plus"] == pytest.approx(1.6e-3)
    plus = next(g for g, n in zip(groups, names) if n == "unet_block16 plus")
    assert all(p.shape[1] == 4 for p in plus["params"])  # the up projections [out, rank]

    sine = create_network(1.0, 4, 4, None, m.text_encoder, m.unet, up_lr_weight="sine+.5", mid_lr_weight="2")
    sine.apply_to(m.text_encoder, m.unet)
    groups, names = sine.prepare_optimizer_params(None, 1.0, 1.0)
    lrs = dict(zip(names, (g["lr"] for g in groups)))
    assert lrs["unet_block12"] == 2.0 and lrs["unet_block16"] == pytest.approx(math.sin(math.pi * 3 / 11 / 2) + 0.5)
    assert lrs["unet_block24"] == pytest.approx(1.5) and lrs["unet_block1"] == 1.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(block_dims="1,2,3"), "expected 25 values"),
    (dict(down_lr_weight="1,2"), "expected 12 values"),
    (dict(up_lr_weight="wavy"), "preset"),
])
def test_block_args_are_validated(kwargs, message):
    from library.families import SD1
    from library.tiny_models import build_tiny_models
    from networks.lora import create_network

    m = build_tiny_models(SD1, seed=9)
    with pytest.raises(ValueError, match=message):
        create_network(1.0, 4, 4, None, m.text_encoder, m.unet, **kwargs)
