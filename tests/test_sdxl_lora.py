"""SDXL in networks.lora and the LoRA tools: kohya's SDXL names and module counts (full-size structure on the meta
device), diffusers' SDXL pipeline as an independent reader of our files, merge == apply, merging into and extracting
from SDXL checkpoint files, resize / svd_merge round trips, and the block-wise options on kohya's 23-block SDXL
table.

Numbers are compared with tests/numerics.py's tolerances (the measured spread each rests on is stated there):
FP32_OUTPUT_REL (5e-4) for outputs computed two ways in fp32 and FP64_OUTPUT_REL (2e-5) for fp64 forwards over fp32
weights. Measured here (SDTRAIN_RECORD_SPREAD=<file>, this file, on an AMD EPYC natively and under
ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2, the larger of the two): diffusers vs ours 1.6e-6 (the text
encoders bit-equal), merged vs applied 2.0e-6 in fp32 and 1.8e-7 in fp64, base + extracted LoRA vs the tuned
model 9.0e-6: the tolerances are 55x / 110x those. Each numeric check was run with a real defect planted (named in
its docstring) and fails by 190x the tolerance or more, or on a shape or key check before any number.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import FAMILIES, SDXL
from library.key_maps import UNET_PREFIX, key_table, original_unet_module
from library.model_loading import checkpoint_from_models, instantiate_models, new_text_encoder
from library.safetensors_io import SafetensorsReader
from library.sd_checkpoint import read_checkpoint
from library.tiny_models import fresh_tiny_models
from networks import (check_lora_weights, extract_lora_from_models, merge_lora, resize_lora, sdxl_merge_lora,
                      svd_merge_lora)
from networks.lora import (create_network, create_network_from_weights, lora_targets, text_encoder_prefixes,
                           unet_names_in_original_layout)
from networks.lora_checkpoint import lora_layers
from networks.lora_files import read_lora_file
from tests.numerics import FP64_OUTPUT_REL, assert_outputs_close

MULTIPLIER = 0.7
LOCON = {"conv_dim": "4", "conv_alpha": "1"}


def tiny(family: str = "sdxl", seed: int = 0):
    return fresh_tiny_models(family, seed)


def randomise_up(network, seed: int = 0, std: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * std)


@torch.no_grad()
def outputs(models, *, unet=None, text_encoders=None, dtype: torch.dtype = torch.float32):
    """(CLIP ViT-L hidden states, bigG hidden states, bigG projected pooled output, U-Net output) on fixed inputs;
    `unet` / `text_encoders` override the models' (the models must already be in `dtype`)."""
    unet = unet if unet is not None else models.unet
    te1, te2 = text_encoders if text_encoders is not None else models.text_encoders
    ids = [tok("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tok in models.tokenizers]
    second = te2(ids[1])
    generator = torch.Generator().manual_seed(1)
    config = unet.config
    latents = torch.randn(1, 4, 8, 8, generator=generator).to(dtype)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator).to(dtype)
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled_width, generator=generator).to(dtype),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]], dtype=dtype)}
    sample = unet(latents, 500, context, added_cond_kwargs=added).sample
    return te1(ids[0]).last_hidden_state, second.last_hidden_state, second.text_embeds, sample


def our_lora(path, *, conv: bool, seed: int, dim: int = 4, alpha: float = 2, family: str = "sdxl"):
    """A LoRA file written by our network on the tiny model (random lora_up, so it does something)."""
    models = tiny(family)
    torch.manual_seed(seed)
    network = create_network(1.0, dim, alpha, None, models.text_encoders, models.unet,
                             **({"conv_dim": str(dim), "conv_alpha": "1"} if conv else {}))
    randomise_up(network, seed)
    network.save_weights(path, None, {"ss_network_module": "networks.lora", "ss_base_model_version":
                                      FAMILIES[family].ss_base_model_version})
    return path


def applied(files, multipliers, family: str = "sdxl"):
    """Fresh tiny models with our network(s) applied from the files, kept in `.networks`."""
    models = tiny(family)
    models.networks = []
    for file, multiplier in zip(files, multipliers):
        network, _ = create_network_from_weights(multiplier, file, None, models.text_encoders, models.unet)
        network.load_weights(file)
        network.apply_to(models.text_encoders, models.unet)
        models.networks.append(network)
    return models


def assert_same_outputs(got_models, want_models, *, base=None, what: str) -> None:
    """Outputs agree in fp32 (FP32_OUTPUT_REL) and, with the forward in fp64 over the same fp32 weights, within
    FP64_OUTPUT_REL (what is left then is the merged weights' own rounding). With `base`, each output must also
    differ from the model without LoRA (the LoRA matters)."""
    plain = outputs(base) if base is not None else None
    for got, want in zip(outputs(got_models), outputs(want_models)):
        assert_outputs_close(got, want, what=f"{what} (fp32)")
    for models in (got_models, want_models):
        for module in (models.unet, *models.text_encoders, *getattr(models, "networks", ())):
            module.double()
    for i, (got, want) in enumerate(zip(outputs(got_models, dtype=torch.float64),
                                        outputs(want_models, dtype=torch.float64))):
        if plain is not None:
            assert (want.float() - plain[i]).abs().max() > 1e-3, f"output {i}: the LoRA changes nothing"
        assert_outputs_close(got, want, what=f"{what} (fp64)", rel=FP64_OUTPUT_REL)


def assert_close(a, b, rel: float = 1e-5, what: str = "") -> None:
    """max |a - b| <= rel * max |b|: fp32 SVD / matmul rounding of a factorisation, which scales with the
    magnitude (the same bound as tests/test_lora_tools.py, measured there)."""
    scale = max(b.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= rel * scale, f"{what}: {(a - b).abs().max().item():.3g} vs {scale:.3g}"


def deltas(path):
    return {name: f.delta() for name, f in read_lora_file(path).modules.items()}


def metadata_of(path):
    with SafetensorsReader(path) as reader:
        return dict(reader.metadata)


def load_model(path):
    with read_checkpoint(path) as checkpoint:
        return instantiate_models(checkpoint)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_lora")
    return save_checkpoint(checkpoint_from_models(tiny()), root / "sdxl_base.safetensors", SaveFormat.SAFETENSORS)


# ------------------------------------------------------------------------------------------ 1. names and counts

# kohya's SDXL names, written out from its documented format (not generated by our code): both encoders keep the
# `text_model` level, the U-Net uses Stability's layout (input_blocks / middle_block / output_blocks; in ResNet
# blocks in_layers.2 = conv1, emb_layers.1 = time_emb_proj, out_layers.3 = conv2, skip_connection = conv_shortcut).
KOHYA_SDXL_ATTENTION_NAMES = [
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_11_mlp_fc2",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
    "lora_te2_text_model_encoder_layers_31_mlp_fc1",
    "lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
    "lora_unet_middle_block_1_proj_out", "lora_unet_output_blocks_0_1_transformer_blocks_9_attn1_to_out_0",
    "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_q", "lora_unet_output_blocks_5_1_proj_out",
]
KOHYA_SDXL_CONV_NAMES = [
    "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
    "lora_unet_input_blocks_1_0_out_layers_3", "lora_unet_input_blocks_4_0_skip_connection",
    "lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_6_0_op", "lora_unet_middle_block_0_in_layers_2",
    "lora_unet_middle_block_2_out_layers_3", "lora_unet_output_blocks_0_0_skip_connection",
    "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv", "lora_unet_output_blocks_8_0_emb_layers_1",
]


def full_size_sdxl():
    from diffusers import UNet2DConditionModel

    configs = SDXL.configs()
    with torch.device("meta"):  # the real structure, nothing allocated
        unet = UNet2DConditionModel.from_config(configs.unet)
        encoders = [new_text_encoder(slot.kind, configs.text_encoders[slot.component]) for slot in SDXL.text_encoders]
    return encoders, unet


def test_full_size_sdxl_counts_and_names_are_kohyas():
    """kohya's log lines for SDXL: text encoders 72 + 192 (12 CLIP ViT-L layers and 32 bigG layers x q/k/v/out/fc1/
    fc2), U-Net 722 (11 Transformer2DModels: 70 transformer blocks x 10 layers + proj_in / proj_out)."""
    encoders, unet = full_size_sdxl()
    network = create_network(1.0, 8, 1, None, encoders, unet)
    names = [m.lora_name for m in network.loras]
    te1 = [n for n in names if n.startswith("lora_te1_")]
    te2 = [n for n in names if n.startswith("lora_te2_")]
    assert (len(te1), len(te2), len(network.text_encoder_loras), len(network.unet_loras)) == (72, 192, 264, 722)
    assert set(KOHYA_SDXL_ATTENTION_NAMES) <= set(names)
    assert not any(n.startswith("lora_te_") or "text_projection" in n for n in names)
    assert not any(part in n for n in names for part in ("down_blocks", "up_blocks", "mid_block_"))

    # LoCon adds 17 ResNet blocks x (in_layers.2, emb_layers.1, out_layers.3) + 11 skip_connections + 2 downsamplers
    # + 2 upsamplers = 66 (our count from the structure; 38 of them are 3x3 convs at conv_dim).
    _, locon = lora_targets(None, unet, conv=True)
    assert len(locon) == 722 + 66 and set(KOHYA_SDXL_CONV_NAMES) <= set(locon)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in locon.values()) == 38


def test_unet_names_are_the_key_tables_original_modules():
    """Every SDXL U-Net LoRA name is `lora_unet_` + the original path of its layer, and that path's weight is a key
    of the U-Net key table (proven against diffusers' own converter by the checkpoint tests), on the full-size
    structure; the refiner's U-Net is named the same way."""
    for family in ("sdxl", "sdxl-refiner"):
        from diffusers import UNet2DConditionModel

        config = FAMILIES[family].configs().unet
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        assert unet_names_in_original_layout(unet)
        originals = {m.original[len(UNET_PREFIX):] for m in key_table("unet", config).mappings}
        paths = {id(module): path for path, module in unet.named_modules()}
        _, targets = lora_targets(None, unet, conv=True)
        for name, module in targets.items():
            original = original_unet_module(config, paths[id(module)])
            assert name == "lora_unet_" + original.replace(".", "_")
            assert original + ".weight" in originals, name
    sdxl_config = SDXL.configs().unet
    assert original_unet_module(sdxl_config, "up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert original_unet_module(sdxl_config, "down_blocks.1.downsamplers.0.conv") == "input_blocks.6.0.op"


def test_text_encoder_prefixes_follow_the_families_slots():
    for family in FAMILIES.values():
        assert text_encoder_prefixes(len(family.text_encoders)) == [s.lora_prefix for s in family.text_encoders]


def test_sd_unets_keep_diffusers_names():
    """The naming switch is SDXL's config (addition_embed_type "text_time"), so SD 1.x / 2.x names do not move."""
    for family in ("sd1", "sd2-512"):
        models = tiny(family)
        assert not unet_names_in_original_layout(models.unet)
        _, targets = lora_targets(models.text_encoder, models.unet, conv=True)
        paths = {id(m): p for p, m in models.unet.named_modules()}
        assert all(name == "lora_unet_" + paths[id(m)].replace(".", "_") for name, m in targets.items())


# ------------------------------------------------------------------------------- 2. applying, the optimizer

def test_apply_restore_and_optimizer_groups_with_two_text_encoders():
    models = tiny()
    reference = outputs(models)
    network = create_network(1.0, 4, 2, None, models.text_encoders, models.unet, **LOCON)
    network.apply_to(models.text_encoders, models.unet)
    assert all(torch.equal(got, want) for got, want in zip(outputs(models), reference))  # lora_up = 0
    randomise_up(network)
    changed = outputs(models)
    for i in (0, 1, 3):  # both encoders' states and the U-Net (the pooled output follows the bigG states)
        assert (changed[i] - reference[i]).abs().max() > 1e-3
    network.restore()
    assert all(torch.equal(got, want) for got, want in zip(outputs(models), reference))
    with pytest.raises(ValueError, match="another text encoder"):
        network.apply_to(list(reversed(models.text_encoders)), models.unet)
    with pytest.raises(ValueError, match="another text encoder"):
        network.apply_to(models.text_encoders[:1], models.unet)

    network.apply_to(models.text_encoders, models.unet)
    groups, names = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)  # kohya: both encoders share one rate
    assert names == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-5, 1e-4]
    te_params = sum(p.numel() for m in network.text_encoder_loras for p in m.parameters())
    assert sum(p.numel() for p in groups[0]["params"]) == te_params
    groups, names = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)  # one rate per encoder
    assert names == ["textencoder1", "textencoder2", "unet"] and [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]
    per_encoder = [{id(p) for p in g["params"]} for g in groups[:2]]
    for prefix, ids in zip(("lora_te1_", "lora_te2_"), per_encoder):
        assert ids == {id(p) for m in network.text_encoder_loras if m.lora_name.startswith(prefix)
                       for p in m.parameters()}
    groups, names = network.prepare_optimizer_params([0, 2e-5], 1e-4, 1e-3)  # rate 0: that encoder is frozen
    assert names == ["textencoder2", "unet"]
    assert not any(p.requires_grad for m in network.text_encoder_loras if m.lora_name.startswith("lora_te1_")
                   for p in m.parameters())
    with pytest.raises(ValueError, match="one per text encoder"):
        network.prepare_optimizer_params([1e-5, 1e-5, 1e-5], 1e-4, 1e-3)


# ---------------------------------------------------------------- block-wise ranks and learning rates (SDXL table)

def kohya_sdxl_block(lora_name: str) -> int:
    """kohya's get_block_index for an SDXL U-Net LoRA name, restated from its names alone (independent of the key map
    the network goes through): 1 + input_blocks index, 10 + middle_block index, 13 + output_blocks index."""
    name = lora_name[len("lora_unet_"):]
    for part, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(part):
            return first + int(name[len(part):].split("_")[0])
    raise AssertionError(lora_name)


def is_kxk(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def test_sdxl_block_dims_and_conv_block_dims_set_each_blocks_rank_and_alpha():
    """kohya's 23 SDXL blocks: Linear / 1x1 layers take block_dims / block_alphas, 3x3 convs conv_block_dims /
    conv_block_alphas, by their block; a block of dim 0 gets no module; the text encoders keep network_dim."""
    models = tiny()
    dims = [b % 4 for b in range(23)]  # 0 in blocks 0, 4, 8 (input_blocks 7: attention), 12, 16, 20
    alphas = [0.5 * b + 1 for b in range(23)]
    conv_dims = [0 if b % 3 == 1 else 1 + b % 5 for b in range(23)]
    conv_alphas = [b + 0.25 for b in range(23)]
    network = create_network(1.0, 8, 2, None, models.text_encoders, models.unet,
                             block_dims=",".join(map(str, dims)), block_alphas=",".join(map(str, alphas)),
                             conv_block_dims=",".join(map(str, conv_dims)),
                             conv_block_alphas=",".join(map(str, conv_alphas)))
    _, targets = lora_targets(models.text_encoders, models.unet, conv=True)
    expected = {}
    for name, module in targets.items():
        block = kohya_sdxl_block(name)
        dim, alpha = (conv_dims[block], conv_alphas[block]) if is_kxk(module) else (dims[block], alphas[block])
        if dim:
            expected[name] = (dim, alpha)
    got = {lora.lora_name: (lora.lora_dim, float(lora.alpha)) for lora in network.unet_loras}
    assert got == expected
    # Not vacuous: dim-0 blocks that hold layers lose them, and the ranks differ by block.
    blocks_with_layers = {kohya_sdxl_block(name) for name in targets}
    assert {8, 12, 16} <= blocks_with_layers and not any(kohya_sdxl_block(n) in (8, 12, 16) and not is_kxk(targets[n])
                                                         for n in got)
    assert {4, 7, 10, 13} <= blocks_with_layers and not any(kohya_sdxl_block(n) in (4, 7, 10, 13) and is_kxk(targets[n])
                                                            for n in got)
    assert len({dim for dim, _ in got.values()}) == 5
    assert got["lora_unet_input_blocks_4_1_proj_in"] == (1, 3.5)  # block 5
    assert got["lora_unet_output_blocks_2_2_conv"] == (1, 15.25)  # the upsampler: block 15
    assert all(lora.lora_dim == 8 and float(lora.alpha) == 2 for lora in network.text_encoder_loras)


def test_sdxl_lr_weights_give_per_block_optimizer_groups():
    """down / mid / up_lr_weight (9 / 3 / 9 values) scale unet_lr for blocks 1-9 / 10-12 / 13-21, blocks 0 and 22
    keep 1; a multiplier <= block_lr_zero_threshold is 0, and a block at 0 gets neither LoRA nor LoCon modules. The
    same multipliers apply to a network made from a file (kohya's create_network_from_weights)."""
    models = tiny()
    down = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    kwargs = dict(down_lr_weight=",".join(map(str, down)), mid_lr_weight="1.5,0,2.5", up_lr_weight="sine+.5",
                  block_lr_zero_threshold="0.25", **LOCON)
    network = create_network(1.0, 4, 2, None, models.text_encoders, models.unet, **kwargs)
    sine = [0.5, 0.6950903, 0.8826834, 1.0555702, 1.2071068, 1.3314696, 1.4238795, 1.4807853, 1.5]
    weights = [1.0] + [0, 0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9] + [1.5, 0, 2.5] + sine + [1.0]
    assert network.block_lr_weights == pytest.approx(weights, abs=1e-7)

    _, targets = lora_targets(models.text_encoders, models.unet, conv=True)
    # Blocks 2 (input_blocks 1: a ResNet block's LoRA and LoCon layers) and 11 (middle_block 1): no modules.
    kept = {lora.lora_name for lora in network.unet_loras}
    assert kept == {n for n in targets if weights[kohya_sdxl_block(n)] != 0}
    assert any(kohya_sdxl_block(n) == 2 and is_kxk(m) for n, m in targets.items())  # a LoCon layer was dropped

    for net in (network, create_network_from_weights(1.0, None, None, models.text_encoders, models.unet,
                                                     weights_sd=network.state_dict(), **kwargs)[0]):
        net.apply_to(models.text_encoders, models.unet)
        groups, names = net.prepare_optimizer_params(1e-5, 1e-3, 1e-4)
        net.restore()
        lrs = dict(zip(names, (g["lr"] for g in groups)))
        blocks = sorted({kohya_sdxl_block(n) for n in kept})
        assert names == ["textencoder"] + [f"unet_block{b}" for b in blocks]
        assert lrs == pytest.approx({"textencoder": 1e-5, **{f"unet_block{b}": 1e-3 * weights[b] for b in blocks}})
        assert blocks == [3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
        for group, name in zip(groups[1:], names[1:]):
            block = int(name[len("unet_block"):])
            assert {id(p) for p in group["params"]} == {id(p) for lora in net.unet_loras
                                                        if kohya_sdxl_block(lora.lora_name) == block
                                                        for p in lora.parameters()}


@pytest.mark.parametrize("family,option,blocks", [("sd1", "down_lr_weight", range(1, 12)),
                                                  ("sdxl", "up_lr_weight", range(13, 22))])
def test_a_zero_learning_rate_drops_locon_modules_too(family, option, blocks):
    """kohya zeroes block_dims and conv_block_dims of a block at learning rate 0: with conv_dim alone (no
    conv_block_dims), its 3x3 convs get no LoCon module either, in either family's table."""
    from networks.lora import unet_block_table
    models = tiny(family)
    network = create_network(1.0, 4, 2, None, models.text_encoders, models.unet, **{option: "zeros"}, **LOCON)
    _, targets = lora_targets(models.text_encoders, models.unet, conv=True)
    table = unet_block_table(models.unet)
    block_of = table.module_blocks(models.unet, targets, option)
    assert any(block_of[n] in blocks and is_kxk(m) for n, m in targets.items())
    assert {lora.lora_name for lora in network.unet_loras} == {n for n in targets if block_of[n] not in blocks}


def test_sdxl_lr_weight_presets_are_kohyas_over_nine_values():
    """kohya's presets, evaluated over SDXL's 9 down / up values (golden numbers: sin(pi k / 16), k / 8)."""
    from networks.lora_blocks import SDXL_BLOCKS
    cosine = [1.0, 0.9807853, 0.9238795, 0.8314696, 0.7071068, 0.5555702, 0.3826834, 0.1950903, 0.0]
    linear = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    cases = {("cosine", None, "linear"): [1.0] + cosine + [1.0] * 3 + linear + [1.0],
             ("sine", "0.5,1,2", "reverse_linear"): [1.0] + cosine[::-1] + [0.5, 1.0, 2.0] + linear[::-1] + [1.0],
             ("zeros+.25", None, "cosine+1"): [1.0] + [0.25] * 9 + [1.0] * 3 + [c + 1 for c in cosine] + [1.0],
             (None, "2,2,2", None): [1.0] * 10 + [2.0] * 3 + [1.0] * 10}
    for (down, mid, up), want in cases.items():
        assert SDXL_BLOCKS.lr_weights(down, mid, up) == pytest.approx(want, abs=1e-7), (down, mid, up)
    # block_lr_zero_threshold: given multipliers <= it become 0; the fixed blocks and the lists not given keep 1.
    assert SDXL_BLOCKS.lr_weights("linear", None, None, 0.3) == pytest.approx(
        [1.0, 0, 0, 0, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0] + [1.0] * 13)
    assert SDXL_BLOCKS.lr_weights(None, None, None) is None


SDXL_TABLE = r"SDXL U-Net, whose 23 blocks are 0: time and label embeddings, 1-9: input_blocks 0-8"


@pytest.mark.parametrize("option,value,message", [
    ("block_dims", ",".join(["4"] * 25), rf"block_dims: 25 value\(s\) given, expected 23 values .*{SDXL_TABLE}"),
    ("block_alphas", ",".join(["1"] * 22), rf"block_alphas: 22 value\(s\) given, expected 23 values .*{SDXL_TABLE}"),
    ("conv_block_dims", "4," * 24 + "4", r"conv_block_dims: 25 value\(s\) given, expected 23 values"),
    ("conv_block_alphas", "1", r"conv_block_alphas: 1 value\(s\) given, expected 23 values"),
    ("block_dims", "4," * 22 + "x", r"block_dims='.*': expected 23 comma-separated ints, one per SDXL U-Net block"),
    ("down_lr_weight", ",".join(["1"] * 12), r"down_lr_weight: 12 value\(s\) given, expected 9 values \(blocks 1-9, "
                                             r"input_blocks 0-8; or a preset\) for this SDXL U-Net"),
    ("up_lr_weight", "1,1", r"up_lr_weight: 2 value\(s\) given, expected 9 values \(blocks 13-21, output_blocks 0-8"),
    ("mid_lr_weight", "2", r"mid_lr_weight: 1 value\(s\) given, expected 3 values \(blocks 10-12, middle_block 0-2\)"),
    ("mid_lr_weight", "sine", r"mid_lr_weight='sine': expected 3 comma-separated numbers, one per block of blocks "
                              r"10-12"),
    ("up_lr_weight", "wavy", r"up_lr_weight='wavy': expected 9 comma-separated numbers or a preset \(cosine, sine"),
])
def test_sdxl_block_options_with_the_wrong_count_are_refused(option, value, message):
    models = tiny("sdxl")
    with pytest.raises(ValueError, match=rf"--network_args {message}"):
        create_network(1.0, 4, 1, None, models.text_encoders, models.unet, **{option: value})


def test_sdxl_refiner_has_no_kohya_block_numbers():
    """The refiner's U-Net has 4 levels (12 input blocks): kohya's SDXL table (the base's 9) would give two blocks one
    number, so the block-wise options are refused for it by name."""
    models = tiny("sdxl-refiner")
    with pytest.raises(ValueError, match=r"--network_args block_dims: kohya's SDXL block table "
                                         r"numbers a U-Net of at most 3 levels of 2 ResNet blocks; this one has 4"):
        create_network(1.0, 4, 1, None, models.text_encoders, models.unet, block_dims=",".join(["4"] * 23))
    with pytest.raises(ValueError, match=r"--network_args mid_lr_weight, up_lr_weight: .* this one has 4 levels"):
        create_network(1.0, 4, 1, None, models.text_encoders, models.unet, up_lr_weight="sine", mid_lr_weight="1,1,1")


# ------------------------------------------------------------------------- 3. diffusers as an independent reader

def diffusers_sdxl_pipeline(models):
    """diffusers' own SDXL pipeline around copies of the tiny models (load_lora_weights changes them in place)."""
    import diffusers

    m = copy.deepcopy(models)
    return diffusers.StableDiffusionXLPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1], tokenizer=m.tokenizers[0],
        tokenizer_2=m.tokenizers[1], unet=m.unet, scheduler=diffusers.EulerDiscreteScheduler())


@pytest.mark.numbers
@pytest.mark.parametrize("network_args", [{}, LOCON], ids=["attention", "locon"])
def test_diffusers_sdxl_pipeline_loads_our_file_to_the_same_outputs(tmp_path, network_args):
    """diffusers converts kohya's SDXL names itself (lora_te1_ -> text_encoder, lora_te2_ -> text_encoder_2,
    input_blocks / middle_block / output_blocks -> its own blocks, by the U-Net config): its pipeline with our file
    computes what our applied network computes, for both encoders and the U-Net. Measured 1.6e-6 at most
    (FP32_OUTPUT_REL 5e-4). Planted: the names of two same-shaped attention blocks swapped (input_blocks_4_1 <->
    input_blocks_5_1) moves the U-Net output by 0.29 (580x); lora_te1 / lora_te2 swapped makes diffusers refuse the
    file (size mismatch). Diffusers-layout U-Net names in the file would pass here (diffusers reads both layouts):
    the name tests above catch that one."""
    models = tiny()
    reference = outputs(models)
    network = create_network(1.0, 4, 2, None, models.text_encoders, models.unet, **network_args)
    randomise_up(network)
    file = tmp_path / "sdxl_lora.safetensors"
    network.save_weights(file, None, {"ss_network_module": "networks.lora"})
    pipe = diffusers_sdxl_pipeline(models)
    pipe.load_lora_weights(str(tmp_path), weight_name=file.name)
    network.apply_to(models.text_encoders, models.unet)
    ours = outputs(models)
    theirs = outputs(models, unet=pipe.unet, text_encoders=[pipe.text_encoder, pipe.text_encoder_2])
    for i, (got, want, base) in enumerate(zip(theirs, ours, reference)):
        assert (want - base).abs().max() > 1e-3, f"output {i}: the LoRA changes nothing"
        assert_outputs_close(got, want, what=f"diffusers' SDXL pipeline vs ours, output {i}")


# ------------------------------------------------------------------------------------------ 4. merge == apply

@pytest.mark.numbers
@pytest.mark.parametrize("network_args", [{}, LOCON], ids=["attention", "locon"])
def test_sdxl_merge_to_equals_apply(network_args):
    """kohya's --base_weights path on SDXL: a network shaped by the weights, merged into both encoders and the U-Net,
    computes what the applied network computes (measured 2.0e-6 in fp32, 1.8e-7 in fp64; tolerances 5e-4 / 2e-5).
    Planted: merge_to leaving out bigG's (lora_te2_) modules moves the outputs by 0.096 .. 0.15 (190x+)."""
    reference_models, merged_models = tiny(), tiny()
    network = create_network(MULTIPLIER, 4, 2, None, reference_models.text_encoders, reference_models.unet,
                             **network_args)
    randomise_up(network)
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    network.apply_to(reference_models.text_encoders, reference_models.unet)
    reference_models.networks = [network]
    merger, _ = create_network_from_weights(MULTIPLIER, None, None, merged_models.text_encoders, merged_models.unet,
                                            weights_sd=weights, for_inference=True)
    merger.merge_to(merged_models.text_encoders, merged_models.unet, weights, dtype=torch.float32)
    assert_same_outputs(merged_models, reference_models, base=tiny(), what="SDXL merge_to vs apply_to")


@pytest.mark.numbers
def test_merge_lora_into_an_sdxl_checkpoint_file(tmp_path, sdxl_file):
    """merge_lora.py (and kohya's name for it, sdxl_merge_lora.py) on an SDXL original file: every weight a module
    touches is W + ratio * ΔW of the applied network's module (bit-equal: the same formula, rounded once), every
    other tensor is as it was, and the model computes what the applied network computes (1.9e-6 / 1.8e-7 measured,
    fp32 / fp64). Planted: the file merge leaving out text_encoder_2's layers fails the weight check, and moves
    bigG's outputs by 1.06 .. 1.2 relative in the extraction test's round trip."""
    lora = our_lora(tmp_path / "lora.safetensors", conv=True, seed=5)
    out = tmp_path / "merged.safetensors"
    assert sdxl_merge_lora.main(["--sd_model", str(sdxl_file), "--models", str(lora), "--ratios", str(MULTIPLIER),
                                 "--save_to", str(out)]) == 0
    reference = applied([lora], [MULTIPLIER])
    with read_checkpoint(sdxl_file) as base, read_checkpoint(out) as merged:
        assert merged.family is SDXL
        layers = lora_layers(base)
        by_name = {m.lora_name: m for m in reference.networks[0].loras}
        touched = set()
        for name, module in by_name.items():
            layer = layers[name]
            want = (base.tensors[layer.component][layer.key].load()
                    + MULTIPLIER * module.merged_weight_delta().reshape(layer.shape))
            assert torch.equal(merged.tensors[layer.component][layer.key].load(), want), name
            touched.add((layer.component, layer.key))
        assert {layer.component for layer in layers.values()} == {"text_encoder", "text_encoder_2", "unet"}
        for component, tensors in base.tensors.items():
            for key, lazy in tensors.items():
                if (component, key) not in touched:
                    assert torch.equal(merged.tensors[component][key].load(), lazy.load()), key
    assert_same_outputs(load_model(out), reference, base=tiny(), what="SDXL file + merged LoRA vs applied")
    metadata = metadata_of(out)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.merged_from"] == "sdxl_base, lora"


def test_sdxl_merge_lora_lbws_base_only_changes_only_the_text_encoders(tmp_path, sdxl_file):
    """kohya's --lbws on SDXL's 20-block table with BASE = 1 and every U-Net block 0: both encoders' LoRA layers are
    merged (bit-equal to W + ratio * ΔW, as in the test above), the U-Net is the base's bit for bit.
    tests/test_lora_block_weights.py checks every block and preset."""
    lora = our_lora(tmp_path / "lora.safetensors", conv=True, seed=5)
    out = tmp_path / "merged.safetensors"
    assert sdxl_merge_lora.main(["--sd_model", str(sdxl_file), "--models", str(lora), "--ratios", str(MULTIPLIER),
                                 "--lbws", json.dumps([1] + [0] * 19), "--save_to", str(out)]) == 0
    modules = read_lora_file(lora).modules
    with read_checkpoint(sdxl_file) as base, read_checkpoint(out) as merged:
        layers = lora_layers(base)
        changed = set()
        for name, factors in modules.items():
            layer = layers[name]
            if layer.component != "unet":
                want = (base.tensors[layer.component][layer.key].load()
                        + MULTIPLIER * factors.delta().reshape(layer.shape))
                assert torch.equal(merged.tensors[layer.component][layer.key].load(), want), name
                changed.add((layer.component, layer.key))
        assert {component for component, _ in changed} == {"text_encoder", "text_encoder_2"}
        for component, tensors in base.tensors.items():
            for key, lazy in tensors.items():
                if (component, key) not in changed:
                    assert torch.equal(merged.tensors[component][key].load(), lazy.load()), key


# ------------------------------------------------------------------------------------------------ 5. extraction

@pytest.mark.numbers
def test_extract_from_two_sdxl_checkpoints_reproduces_the_difference(tmp_path, sdxl_file, capsys):
    """Every LoRA-able layer of both encoders and the U-Net (LoCon included) fine-tuned: extraction at full rank
    gives exactly the differences (fp32 SVD rounding, assert_close), under kohya's SDXL names and SDXL metadata,
    and base + extracted LoRA computes what the tuned model computes (9.0e-6 measured; FP32_OUTPUT_REL 5e-4).
    Planted: an extraction that leaves out text_encoder_2's layers fails the module-set check."""
    tuned = tiny()
    generator = torch.Generator().manual_seed(21)
    te_targets, unet_targets = lora_targets(tuned.text_encoders, tuned.unet, conv=True)
    with torch.no_grad():
        for module in [*te_targets.values(), *unet_targets.values()]:
            module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.05)
    tuned_path = save_checkpoint(checkpoint_from_models(tuned), tmp_path / "tuned", SaveFormat.DIFFUSERS)
    out = tmp_path / "extracted.safetensors"
    assert extract_lora_from_models.main(["--sdxl", "--model_org", str(sdxl_file), "--model_tuned", str(tuned_path),
                                          "--dim", "64", "--conv_dim", "64", "--clamp_quantile", "1",
                                          "--min_diff", "0", "--save_to", str(out)]) == 0
    original = tiny()
    original_targets = {}
    for targets in lora_targets(original.text_encoders, original.unet, conv=True):
        original_targets.update(targets)
    expected = {name: (module.weight - original_targets[name].weight).detach()
                for name, module in {**te_targets, **unet_targets}.items()}
    extracted = deltas(out)
    assert extracted.keys() == expected.keys()
    assert {n.split("_")[1] for n in extracted} == {"te1", "te2", "unet"}
    for name, delta in extracted.items():
        assert_close(delta, expected[name].reshape(delta.shape), what=name)
    metadata = metadata_of(out)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    merged = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--sd_model", str(sdxl_file), "--models", str(out), "--save_to", str(merged)]) == 0
    for i, (got, want) in enumerate(zip(outputs(load_model(merged)), outputs(tuned))):
        assert_outputs_close(got, want, what=f"SDXL base + extracted LoRA vs tuned, output {i}")

    # kohya's --sdxl is an assertion here: on an SD 1.x model it is refused, nothing written.
    sd1 = save_checkpoint(checkpoint_from_models(tiny("sd1")), tmp_path / "sd1.safetensors", SaveFormat.SAFETENSORS)
    refused = tmp_path / "refused.safetensors"
    capsys.readouterr()
    assert extract_lora_from_models.main(["--sdxl", "--model_org", str(sd1), "--model_tuned", str(sd1),
                                          "--save_to", str(refused)]) == 2
    err = capsys.readouterr().err
    assert "--sdxl was given" in err and "sd1.safetensors" in err and "Stable Diffusion 1.x" in err
    assert not refused.exists()


# ------------------------------------------------------------------------------- 6. resize, svd_merge, check

def test_resize_svd_merge_and_check_keep_sdxl_files_whole(tmp_path, capsys):
    """The file tools read factors, not models: an SDXL LoRA round-trips at full rank with its names and
    ss_base_model_version kept (assert_close: fp32 SVD rounding, as tests/test_lora_tools.py)."""
    a = our_lora(tmp_path / "a.safetensors", conv=True, seed=1)
    b = our_lora(tmp_path / "b.safetensors", conv=True, seed=2)
    resized = tmp_path / "resized.safetensors"
    assert resize_lora.main(["--model", str(a), "--new_rank", "4", "--save_to", str(resized)]) == 0
    before = deltas(a)
    after = deltas(resized)
    assert after.keys() == before.keys()
    for name, delta in after.items():
        assert_close(delta, before[name], what=name)
    assert metadata_of(resized)["ss_base_model_version"] == "sdxl_base_v1-0"

    summed = tmp_path / "summed.safetensors"
    assert svd_merge_lora.main(["--models", str(a), str(b), "--ratios", "0.7", "-0.4", "--new_rank", "8",
                                "--new_conv_rank", "8", "--clamp_quantile", "1", "--save_to", str(summed)]) == 0
    other = deltas(b)
    for name, delta in deltas(summed).items():
        assert_close(delta, 0.7 * before[name] - 0.4 * other[name], what=name)
    metadata = metadata_of(summed)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "8.0"}

    capsys.readouterr()
    assert check_lora_weights.main([str(a)]) == 0
    modules = len(read_lora_file(a).modules)
    assert f"OK: {modules} modules, {modules} alphas, 0 flagged" in capsys.readouterr().out


def test_lora_layers_cover_every_family_component(tiny_checkpoints):
    """Each text encoder's modules change that encoder's tensors (the refiner's one encoder is `lora_te`)."""
    for family, components in (("sdxl", {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}),
                               ("sdxl-refiner", {"lora_te": "text_encoder_2"}), ("sd1", {"lora_te": "text_encoder"})):
        layers = lora_layers(tiny_checkpoints[family], conv=False)
        for name, layer in layers.items():
            prefix = name.split("_text_model_")[0] if "_text_model_" in name else "lora_unet"
            assert layer.component == components.get(prefix, "unet"), name
            assert isinstance(layer.shape, tuple) and layer.key.endswith(".weight")
        assert set(components.values()) <= {layer.component for layer in layers.values()}


def test_network_and_tools_agree_on_sdxl_names(tiny_checkpoints):
    checkpoint = tiny_checkpoints["sdxl"]
    models = instantiate_models(checkpoint)
    network = create_network(1.0, 4, 1, None, models.text_encoders, models.unet, **LOCON)
    layers = lora_layers(checkpoint)
    assert {m.lora_name for m in network.loras} == set(layers)
    for module in network.loras:
        layer = layers[module.lora_name]
        weight = module.org_module.weight
        assert tuple(weight.shape) == layer.shape
        assert torch.equal(weight, checkpoint.tensors[layer.component][layer.key].load()), module.lora_name
    assert all(isinstance(m.org_module, (nn.Linear, nn.Conv2d)) for m in network.loras)
