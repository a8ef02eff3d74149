"""kohya's other network modules: networks.lora_fa (LoRA-FA), networks.dylora (DyLoRA, with
networks/extract_lora_from_dylora.py) and networks.oft (OFT, with networks/convert_oft.py).

Checked for each: kohya's key names and shapes for SD 1.x and SDXL, a fresh network changes nothing, restore gives
the original outputs bit for bit, merging equals applying, file round trips, the type's own promise (LoRA-FA's
frozen down matrices, DyLoRA's rank truncation, OFT's orthogonal rotations within the constraint), independent
readers of the files (diffusers for the LoRA-layout types, LyCORIS for converted OFT files), gen_img.py, and the bad
inputs a user can fix. Training runs of train_network.py are in tests/test_train_network.py.

Numbers computed two ways are compared with tests/numerics.py's tolerances (FP32_OUTPUT_REL, measured spread
stated there); where the same operations run on the same tensors the check is bit equality.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from library.families import FAMILIES, SD1
from library.key_maps import UNET_PREFIX, key_table
from library.safetensors_io import SafetensorsReader
from library.tiny_models import build_tiny_models, fresh_tiny_models
from networks import convert_oft, dylora, extract_lora_from_dylora, lora, lora_fa, oft
from tests.numerics import assert_outputs_close

UNIT = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads (see tests/test_lora.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family: str = "sd1"):
    return fresh_tiny_models(family, 0)


def encoders(models):
    return models.text_encoders if len(models.text_encoders) > 1 else models.text_encoders[0]


@torch.no_grad()
def outputs(models) -> list[torch.Tensor]:
    """Every text encoder's last hidden states and the U-Net's prediction, on fixed inputs."""
    result = []
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        ids = tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        result.append(encoder(ids).last_hidden_state)
    unet = models.unet
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size / crop ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=generator),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    result.append(unet(latents, 500, context, added_cond_kwargs=added).sample)
    return result


def make(kind: str, models, **kwargs):
    """A network of `kind` on `models` with kohya-like settings (rank 4 / 4 blocks), in eval mode: a DyLoRA in
    training mode computes only at a rank drawn for a training step (begin_step)."""
    te = encoders(models)
    if kind == "lora_fa":
        network = lora_fa.create_network(1.0, 4, 2, None, te, models.unet, **kwargs)
    elif kind == "dylora":
        network = dylora.create_network(1.0, 4, 2, None, te, models.unet, unit=str(UNIT), **kwargs)
    else:
        network = oft.create_network(1.0, 4, 1e-2, None, te, models.unet, **kwargs)
    return network.eval()


@torch.no_grad()
def randomise(network, seed: int = 0, std: float = 0.1) -> None:
    """Fresh networks change nothing (up = 0, blocks = 0): give every trainable tensor something to do."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.loras:
        for tensor in (module.up_parameters() if hasattr(module, "up_parameters") else [module.oft_blocks]):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def state(network) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in network.state_dict().items()}


KINDS = ["lora_fa", "dylora", "oft"]


# ----------------------------------------------------------------------------------- 1. kohya's names and shapes


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["lora_fa", "dylora"])
def test_lora_layout_types_write_networks_loras_keys_and_shapes(kind, family):
    """LoRA-FA and DyLoRA files are plain kohya LoRA files: exactly networks.lora's keys (SDXL: lora_te1 / lora_te2
    and the original layout, which kohya's own DyLoRA lacks), shapes and dtypes, LoCon included."""
    models = tiny(family)
    ours = make(kind, models, conv_dim="4", **({"conv_alpha": "2"} if kind == "lora_fa" else {})).state_dict()
    plain = lora.create_network(1.0, 4, 2, None, encoders(models), models.unet, conv_dim="4", conv_alpha="2")
    reference = plain.state_dict()
    assert list(ours) and set(ours) == set(reference)
    for key, tensor in reference.items():
        assert (tuple(ours[key].shape), ours[key].dtype) == (tuple(tensor.shape), tensor.dtype), key
    prefixes = {key.split("_text_model")[0] for key in ours if key.startswith("lora_te")}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    if family == "sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in ours
    # DyLoRA: conv modules at the network's rank and alpha (kohya's rule); LoRA-FA: the conv_alpha given
    assert all(float(ours[k]) == 2.0 for k in ours if k.endswith(".alpha"))


# Full-size structures (meta device): kohya's OFT targets the 4 projections of each attention (SD 1.5: 16 transformer
# blocks x 2 attentions x 4 = 128; SDXL: 70 x 2 x 4 = 560); enable_all_linear every Linear / 1x1 conv of the
# transformer blocks (networks.lora's 192 / 722); enable_conv adds the ResNet blocks and samplers (LoCon's 86 / 66).
OFT_COUNTS = {"sd1": (128, 192, 128 + 86), "sdxl": (560, 722, 560 + 66)}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_oft_module_counts_and_names_on_full_size_structures(family):
    from diffusers import UNet2DConditionModel

    config = FAMILIES[family].configs().unet
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    counts = [len(oft.create_network(1.0, 4, 1e-3, None, None, unet, **flags).loras) for flags in
              ({}, {"enable_all_linear": "True"}, {"enable_conv": "True"})]
    assert tuple(counts) == OFT_COUNTS[family]
    network = oft.create_network(1.0, 4, 1e-3, None, None, unet, enable_all_linear="true", enable_conv="true")
    names = {m.lora_name for m in network.loras}
    # The same layers as networks.lora's LoCon, named oft_unet_ + the same path.
    _, locon = lora.lora_targets(None, unet, conv=True)
    assert names == {"oft_unet_" + n[len("lora_unet_"):] for n in locon}
    if family == "sdxl":
        # WebUI finds a kohya OFT module by replacing oft_unet with diffusion_model and looking the result up among
        # its original-layout module names: every name must be an original U-Net weight's module.
        originals = {m.original[len(UNET_PREFIX):-len(".weight")].replace(".", "_")
                     for m in key_table("unet", config).mappings if m.original.endswith(".weight")}
        assert {n[len("oft_unet_"):] for n in names} <= originals
        assert "oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    else:
        assert "oft_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in names


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_oft_file_layout_is_kohyas(tmp_path, family):
    """`<name>.oft_blocks` [blocks, out/blocks, out/blocks] and a scalar fp32 `<name>.alpha`, U-Net only."""
    models = tiny(family)
    network = make("oft", models)
    network.save_weights(tmp_path / "oft.safetensors", None, {"ss_network_module": "networks.oft"})
    with SafetensorsReader(tmp_path / "oft.safetensors") as reader:
        tensors = {k: reader.read(k) for k in reader.keys()}
    assert len(tensors) == 2 * len(network.loras) and all(k.startswith("oft_unet_") for k in tensors)
    for module in network.loras:
        blocks, alpha = tensors[f"{module.lora_name}.oft_blocks"], tensors[f"{module.lora_name}.alpha"]
        out = module.org_module.out_features if isinstance(module.org_module, nn.Linear) else \
            module.org_module.out_channels
        assert tuple(blocks.shape) == (4, out // 4, out // 4) and not blocks.any()
        assert alpha.shape == () and alpha.dtype == torch.float32 and math.isclose(alpha.item(), 1e-2, rel_tol=1e-6)


# ------------------------------------------------------------------------- 2. apply, restore, merge, round trips


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_network_is_a_no_op_and_restore_is_exact(kind):
    models = tiny()
    reference = outputs(models)
    network = make(kind, models, **({"enable_conv": "true"} if kind == "oft" else {"conv_dim": "4"}))
    network.apply_to(encoders(models), models.unet)
    for got, want in zip(outputs(models), reference):
        assert torch.equal(got, want)  # up / blocks start at zero
    randomise(network)
    assert all((got - want).abs().max() > 1e-3 for got, want in zip(outputs(models)[-1:], reference[-1:]))
    network.restore()
    for got, want in zip(outputs(models), reference):
        assert torch.equal(got, want)
    assert all("forward" not in m.org_module.__dict__ for m in network.loras)


@pytest.mark.numbers
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("kind", KINDS)
def test_merging_equals_applying(kind, multiplier):
    """Through create_network_from_weights + merge_to, as gen_img.py --network_merge and --base_weights do."""
    applied, merged = tiny(), tiny()
    extra = {"enable_conv": "true"} if kind == "oft" else {"conv_dim": "4"}
    network = make(kind, applied, **extra)
    network.set_multiplier(multiplier)
    randomise(network)
    weights = state(network)
    network.apply_to(encoders(applied), applied.unet)
    module = {"lora_fa": lora_fa, "dylora": dylora, "oft": oft}[kind]
    merger, _ = module.create_network_from_weights(multiplier, None, None, encoders(merged), merged.unet,
                                                   weights_sd=weights, for_inference=True)
    merger.merge_to(encoders(merged), merged.unet, weights, dtype=torch.float32)
    for got, want in zip(outputs(merged), outputs(applied)):
        assert_outputs_close(got, want, what=f"{kind} merged vs applied")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_bit_exact(tmp_path, kind, suffix):
    models = tiny()
    network = make(kind, models)
    randomise(network)
    network.save_weights(tmp_path / f"net{suffix}", None, {"ss_network_module": f"networks.{kind}"})
    torch.manual_seed(123)  # other random initial weights
    other = make(kind, models)
    info = other.load_weights(tmp_path / f"net{suffix}")
    assert not info.missing_keys and not info.unexpected_keys
    saved, loaded = network.state_dict(), other.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    module = {"lora_fa": lora_fa, "dylora": dylora, "oft": oft}[kind]
    rebuilt, weights = module.create_network_from_weights(1.0, str(tmp_path / f"net{suffix}"), None,
                                                          encoders(models), models.unet)
    rebuilt.load_state_dict(weights)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("kind", ["lora_fa", "dylora"])
def test_lora_tools_read_the_lora_layout_files(tmp_path, kind, capsys):
    """LoRA-FA and DyLoRA files are plain LoRA files to kohya's LoRA tools: check_lora_weights finds nothing foreign
    or broken, resize_lora cuts them to a lower rank, and refuses an OFT file by name."""
    from networks import check_lora_weights, resize_lora

    models = tiny()
    network = make(kind, models, conv_dim="4")
    randomise(network)
    network.save_weights(tmp_path / "net.safetensors", None, {"ss_network_module": f"networks.{kind}"})
    assert check_lora_weights.main([str(tmp_path / "net.safetensors")]) == 0
    assert resize_lora.main(["--model", str(tmp_path / "net.safetensors"), "--new_rank", "2", "--save_to",
                             str(tmp_path / "r2.safetensors")]) == 0
    with SafetensorsReader(tmp_path / "r2.safetensors") as reader:
        assert {reader.read(k).shape[0] for k in reader.keys() if k.endswith("lora_down.weight")} == {2}
    make("oft", models).save_weights(tmp_path / "oft.safetensors", None, {})
    assert resize_lora.main(["--model", str(tmp_path / "oft.safetensors"), "--new_rank", "2", "--save_to",
                             str(tmp_path / "bad.safetensors")]) == 2
    assert "OFT" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- 3. LoRA-FA


def test_lora_fa_down_matrices_are_frozen_buffers():
    models = tiny()
    network = make("lora_fa", models, conv_dim="4")
    down_keys = {k for k in network.state_dict() if k.endswith("lora_down.weight")}
    assert down_keys and not any(n.endswith("lora_down.weight") for n, _ in network.named_parameters())
    # kohya's normal initialisation: std sqrt(2 / (in + rank)) (in: the input channels, also for convs)
    module = network.unet_loras[0]
    in_dim = module.org_module.in_features if isinstance(module.org_module, nn.Linear) else \
        module.org_module.in_channels
    assert abs(module.lora_down.weight.std().item() / math.sqrt(2 / (in_dim + 4)) - 1) < 0.2
    network.apply_to(models.text_encoder, models.unet)
    groups, names = network.prepare_optimizer_params(1e-4, 1e-3, 1e-3)
    trained = {id(p) for g in groups for p in g["params"]}
    assert names == ["textencoder", "unet"]
    assert trained == {id(m.lora_up.weight) for m in network.loras}  # the up matrices, nothing else


def test_lora_fa_max_norm_scales_the_up_matrices_only():
    models = tiny()
    network = make("lora_fa", models)
    randomise(network, std=1.0)
    downs = {k: v for k, v in state(network).items() if k.endswith("lora_down.weight")}
    scaled, _, largest = network.apply_max_norm_regularization(0.5)
    assert scaled > 0 and largest <= 0.5 * (1 + 1e-5)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in downs.items())
    assert max(m.merged_weight_delta().norm().item() for m in network.loras) <= 0.5 * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------- 4. DyLoRA


def dylora_network(models, rank: int = 8, **kwargs):
    network = dylora.create_network(1.0, rank, 4, None, encoders(models), models.unet, unit=str(UNIT),
                                    conv_dim=str(rank), **kwargs)
    randomise(network)
    return network.eval()


def test_dylora_step_trains_the_drawn_unit_at_its_truncated_rank():
    """In training the network computes what its first b ranks compute as a LoRA (alpha / b), with b drawn per
    step from the seed, and only the b-th unit receives gradients: the lower ones are frozen for the step."""
    models = tiny()
    network = dylora_network(models)
    network.apply_to(models.text_encoder, models.unet)
    network.train()
    draws = {network.begin_step(seed) for seed in range(40)}
    assert draws == {2, 4, 6, 8}  # every multiple of the unit up to the rank, from the seed alone
    assert network.begin_step(5) == network.begin_step(5)

    rank = network.begin_step(5)
    trained = outputs(models)
    # The same computation by a networks.lora network holding the first `rank` ranks.
    reference_models = tiny()
    plain = lora.create_network(1.0, rank, 4, None, reference_models.text_encoder, reference_models.unet,
                                conv_dim=str(rank), conv_alpha="4")
    plain.load_state_dict(extract_lora_truncation(state(network), rank))
    plain.apply_to(reference_models.text_encoder, reference_models.unet)
    for got, want in zip(trained, outputs(reference_models)):
        assert torch.equal(got, want)

    with torch.enable_grad():
        outputs_with_grad = network_forward_with_grad(models)
    outputs_with_grad.backward()
    unit = rank // UNIT - 1
    for module in network.loras:
        for i, (down, up) in enumerate(zip(module.down_parameters(), module.up_parameters())):
            assert (down.grad is not None) == (i == unit) and (up.grad is not None) == (i == unit), module.lora_name
    network.eval()  # outside training: the full rank
    full = outputs(models)
    network.set_rank(rank)
    for got, want in zip(outputs(models), trained):
        assert torch.equal(got, want)
    network.set_rank(None)
    assert torch.equal(outputs(models)[-1], full[-1])


def network_forward_with_grad(models) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    ids = models.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    context = models.text_encoder(ids).last_hidden_state
    return models.unet(latents, 500, context).sample.square().mean()


def extract_lora_truncation(weights: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """An independent truncation of a LoRA state dict (first `rank` rows of down, columns of up, alpha kept)."""
    out = {}
    for key, value in weights.items():
        out[key] = value[:rank] if key.endswith("lora_down.weight") else \
            value[:, :rank] if key.endswith("lora_up.weight") else value
    return out


def test_dylora_units_keep_their_optimizer_state_apart():
    """A unit not drawn for a step has no gradient, so AdamW leaves it exactly as it was (no momentum or weight
    decay moves it): what "frozen for the step" means."""
    models = tiny()
    network = dylora_network(models, rank=4)
    network.apply_to(models.text_encoder, models.unet)
    groups, _ = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
    network.train()
    seed = next(s for s in range(100) if network.begin_step(s) == 4)  # step 1 trains the upper unit
    before = [t.detach().clone() for m in network.loras for t in m.down_parameters() + m.up_parameters()]
    network.begin_step(seed)
    network_forward_with_grad(models).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seed = next(s for s in range(100) if network.begin_step(s) == 2)  # step 2 trains the lower unit only
    network.begin_step(seed)
    middle = [t.detach().clone() for m in network.loras for t in m.down_parameters() + m.up_parameters()]
    network_forward_with_grad(models).backward()
    optimizer.step()
    after = [t.detach() for m in network.loras for t in m.down_parameters() + m.up_parameters()]
    # parameters interleave per module: down units (0, 1) then up units (0, 1)
    for i, (b, m, a) in enumerate(zip(before, middle, after)):
        upper = i % 2 == 1
        if upper:
            assert not torch.equal(b, m) and torch.equal(m, a)  # trained in step 1, untouched in step 2
        else:
            assert torch.equal(b, m) and not torch.equal(m, a)


@pytest.mark.parametrize("rank", [2, 4, 6])
def test_extracted_lora_equals_the_dylora_truncated_at_its_rank(tmp_path, rank):
    """extract_lora_from_dylora.py: the file at rank r is the DyLoRA's first r ranks (bit for bit), and a plain
    networks.lora network reading it computes exactly what DyLoRANetwork.set_rank(r) computes."""
    models = tiny()
    network = dylora_network(models)
    source = tmp_path / "dy.safetensors"
    network.save_weights(source, None, {"ss_network_module": "networks.dylora", "ss_network_dim": "8",
                                        "ss_network_args": json.dumps({"unit": str(UNIT), "conv_dim": "8"}),
                                        "ss_training_comment": "trained"})
    assert extract_lora_from_dylora.main(["--model", str(source), "--save_to", str(tmp_path / "cut.safetensors"),
                                          "--rank", str(rank)]) == 0  # --unit from the metadata
    path = tmp_path / f"cut-{rank:04d}.safetensors"
    with SafetensorsReader(path) as reader:
        cut = {k: reader.read(k) for k in reader.keys()}
        metadata = dict(reader.metadata)
    full = state(network)
    assert cut.keys() == full.keys()
    for key, value in extract_lora_truncation(full, rank).items():
        assert torch.equal(cut[key], value), key
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == str(rank)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": str(rank), "conv_alpha": "4.0"}
    assert metadata["ss_training_comment"] == f"split from DyLoRA, rank 8 to {rank}; trained"

    network.apply_to(models.text_encoder, models.unet)
    network.eval()
    network.set_rank(rank)
    truncated = outputs(models)
    plain_models = tiny()
    plain, weights = lora.create_network_from_weights(1.0, str(path), None, plain_models.text_encoder,
                                                      plain_models.unet)
    plain.load_state_dict(weights)
    plain.apply_to(plain_models.text_encoder, plain_models.unet)
    for got, want in zip(outputs(plain_models), truncated):
        assert torch.equal(got, want)


def test_extraction_writes_every_lower_rank_by_default_with_kohyas_names(tmp_path):
    models = tiny()
    network = dylora_network(models)
    network.save_weights(tmp_path / "dy.safetensors", None, {})
    assert extract_lora_from_dylora.main(["--model", str(tmp_path / "dy.safetensors"), "--save_to",
                                          str(tmp_path / "out" / "lora.safetensors"), "--unit", str(UNIT)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "lora-0002.safetensors", "lora-0004.safetensors", "lora-0006.safetensors"]


@pytest.mark.numbers
@pytest.mark.parametrize("rank", [4, 8])
def test_diffusers_loads_the_extracted_and_the_full_file_like_our_network(tmp_path, rank):
    """diffusers' load_lora_weights (an independent reader) computes, from the extracted rank-4 file and from the
    DyLoRA file itself (WebUI and ComfyUI load it as it is, at the full rank), the U-Net and text-encoder outputs of
    our network at that rank."""
    from diffusers import StableDiffusionPipeline

    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.model_loading import checkpoint_from_models

    models = tiny()
    reference = outputs(models)
    network = dylora_network(models)
    source = tmp_path / "dy.safetensors"
    network.save_weights(source, None, {"ss_network_args": json.dumps({"unit": str(UNIT)})})
    if rank < 8:
        assert extract_lora_from_dylora.main(["--model", str(source), "--save_to", str(tmp_path / "cut.safetensors"),
                                              "--rank", str(rank)]) == 0
    path = source if rank == 8 else tmp_path / f"cut-{rank:04d}.safetensors"
    save_checkpoint(checkpoint_from_models(models), tmp_path / "pipe", SaveFormat.DIFFUSERS_SAFETENSORS)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    network.apply_to(models.text_encoder, models.unet)
    network.eval()
    network.set_rank(rank)
    ours = outputs(models)
    theirs = outputs(type(models)(models.family, models.prediction_type, pipe.unet, pipe.vae, [pipe.text_encoder],
                                  models.tokenizers, models.scheduler_config))
    for got, want, base in zip(theirs, ours, reference):
        assert (want - base).abs().max() > 1e-2  # the LoRA matters...
        assert_outputs_close(got, want, what=f"diffusers vs our DyLoRA at rank {rank}")  # ...and is read as we compute


# ------------------------------------------------------------------------------------------------------ 5. OFT


@pytest.mark.numbers
def test_oft_rotations_are_orthogonal_within_the_constraint():
    """Every block of R is orthogonal (RᵀR = I to fp32 rounding: 8 x 8 and 16 x 16 solves, measured 9e-7, also for
    an unconstrained |Q| of 47; 1e-5 allows 11x) and
    |Q| is at most alpha * out; blocks far larger than the constraint are scaled down to it, small ones kept."""
    models = tiny()
    network = make("oft", models)  # alpha 1e-2
    randomise(network, std=1.0)  # |Q| of order 10, the constraint 0.32 / 0.64: every module clamped
    for module in network.loras:
        r = module.rotation()
        eye = torch.eye(module.block_size).expand_as(r)
        assert (r.transpose(1, 2) @ r - eye).abs().max() <= 1e-5
        raw = (module.oft_blocks - module.oft_blocks.transpose(1, 2)).norm().item()
        assert raw > module.constraint and math.isclose(module.skew().norm().item(), module.constraint,
                                                        rel_tol=1e-5)
        # rotating the output rows keeps each input column's length within a block (the angles OFT preserves)
        w = module.org_module.weight.detach().float()
        rotated = module.rotated_weight(w)
        lengths = lambda t: t.reshape(module.num_blocks, module.block_size, -1).norm(dim=1)
        assert torch.allclose(lengths(rotated), lengths(w), rtol=1e-5, atol=1e-6)
    small = make("oft", models)
    randomise(small, std=1e-4)
    module = small.loras[0]
    assert torch.equal(module.skew(), module.oft_blocks - module.oft_blocks.transpose(1, 2))  # within: untouched


def test_oft_multiplier_blends_the_rotation_as_kohya_and_webui_do():
    """m (R - I) + I: multiplier 0 is the base layer, 1 the rotation; WebUI's merge (W + m (Rᵀ W - W)) is the
    same weight."""
    models = tiny()
    network = make("oft", models)
    randomise(network, std=0.05)
    module = network.loras[0]
    w = module.org_module.weight.detach().float()
    full = module.rotated_weight(w)
    module.multiplier = 0.3
    assert torch.allclose(module.rotated_weight(w), w + 0.3 * (full - w), atol=1e-6)


@pytest.mark.numbers
def test_converted_oft_file_is_read_by_lycoris_to_the_same_outputs(tmp_path):
    """networks/convert_oft.py: LyCORIS' diagonal OFT (an independent implementation of the math ComfyUI and WebUI
    share) reading the converted file computes our network's U-Net output, with the constraint active on every
    module (folded into the blocks). LyCORIS' generic wrapper names modules `lycoris_<path>`, ComfyUI's other
    accepted prefix: the test renames lora_unet_ to it."""
    pytest.importorskip("lycoris")
    from lycoris.wrapper import create_lycoris_from_weights

    models = tiny()
    reference = outputs(models)
    # 8 blocks: LyCORIS rebuilds a module only where it has at least as many blocks as each block's size
    network = oft.create_network(1.0, 8, 1e-3, None, models.text_encoder, models.unet, enable_conv="true")
    randomise(network, std=0.05)
    network.save_weights(tmp_path / "oft.safetensors", None, {"ss_network_module": "networks.oft"})
    assert convert_oft.main(["--model", str(tmp_path / "oft.safetensors"), "--save_to",
                             str(tmp_path / "converted.safetensors")]) == 0
    with SafetensorsReader(tmp_path / "converted.safetensors") as reader:
        converted = {k: reader.read(k) for k in reader.keys()}
        metadata = dict(reader.metadata)
    assert len(converted) == 2 * len(network.loras)
    assert all(k.startswith("lora_unet_") for k in converted) and metadata["ss_network_module"] == "lycoris.kohya"
    assert all(converted[k].item() == 0.0 for k in converted if k.endswith(".alpha"))
    assert all((m.oft_blocks - m.oft_blocks.transpose(1, 2)).norm() > m.constraint for m in network.loras)

    network.apply_to(models.text_encoder, models.unet)
    ours = outputs(models)[-1]
    network.restore()
    lycoris, _ = create_lycoris_from_weights(
        1.0, None, models.unet, weights_sd={k.replace("lora_unet_", "lycoris_"): v for k, v in converted.items()})
    assert len(lycoris.loras) == len(network.loras)
    lycoris.apply_to()
    theirs = outputs(models)[-1]
    assert (ours - reference[-1]).abs().max() > 1e-2
    assert_outputs_close(theirs, ours, what="LyCORIS reading the converted OFT file vs ours")


def test_convert_oft_keeps_sdxl_names_and_refuses_other_files(tmp_path, capsys):
    models = tiny("sdxl")
    network = make("oft", models)
    network.save_weights(tmp_path / "oft.safetensors", None, {})
    assert convert_oft.main(["--model", str(tmp_path / "oft.safetensors"), "--save_to",
                             str(tmp_path / "c.safetensors")]) == 0
    with SafetensorsReader(tmp_path / "c.safetensors") as reader:
        keys = set(reader.keys())
    assert keys == {"lora_unet_" + k[len("oft_unet_"):] for k in network.state_dict()}
    plain = lora.create_network(1.0, 4, 1, None, models.text_encoders, models.unet)
    plain.save_weights(tmp_path / "lora.safetensors", None, {})
    assert convert_oft.main(["--model", str(tmp_path / "lora.safetensors"), "--save_to",
                             str(tmp_path / "x.safetensors")]) == 2
    assert "not a kohya OFT file" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------------ 6. gen_img.py


@pytest.fixture(scope="module")
def gen_files(tmp_path_factory):
    """A tiny SD 1.x model file and one file per network type with random non-zero weights."""
    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.model_loading import checkpoint_from_models

    root = tmp_path_factory.mktemp("gen_networks")
    models = build_tiny_models(SD1, seed=3)
    files = {"model": save_checkpoint(checkpoint_from_models(models), root / "sd1.safetensors",
                                      SaveFormat.SAFETENSORS)}
    for kind in KINDS:
        network = make(kind, models)
        randomise(network, seed=1, std=0.2)
        files[kind] = root / f"{kind}.safetensors"
        network.save_weights(files[kind], None, {"ss_network_module": f"networks.{kind}"})
    return files


def generate(files, tmp_path, outdir: str, *args) -> np.ndarray:
    import gen_img
    from PIL import Image

    argv = ["--ckpt", str(files["model"]), "--outdir", str(tmp_path / outdir), "--W", "64", "--H", "64",
            "--prompt", "a red circle --d 7", "--steps", "4", "--scale", "5", "--sampler", "euler_a"]
    (path,) = gen_img.run(gen_img.setup_parser().parse_args(argv + [str(a) for a in args]))
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("kind", KINDS)
def test_gen_img_applies_and_merges_each_type(gen_files, tmp_path, kind):
    """--network_module networks.<kind> --network_weights: the network changes the image; merged (--network_merge),
    or merged per batch (--network_pre_calc), it gives the same image (fp32 rounding: at most 1 level). LoRA-FA and DyLoRA files are plain LoRAs: networks.lora
    reading them draws the very same image."""
    network = ["--network_module", f"networks.{kind}", "--network_weights", gen_files[kind]]
    base = generate(gen_files, tmp_path, "base")
    applied = generate(gen_files, tmp_path, "applied", *network)
    merged = generate(gen_files, tmp_path, "merged", *network, "--network_merge")
    pre_calculated = generate(gen_files, tmp_path, "pre_calc", *network, "--network_pre_calc")
    assert np.abs(applied - base).max() > 10
    assert np.abs(applied - merged).max() <= 1 and np.abs(applied - pre_calculated).max() <= 1
    if kind != "oft":
        as_lora = generate(gen_files, tmp_path, "as_lora", "--network_weights", gen_files[kind])
        assert np.array_equal(as_lora, applied)


def test_gen_img_refuses_an_oft_file_under_the_lora_module(gen_files, tmp_path):
    with pytest.raises(SystemExit, match="a kohya OFT file.*--network_module networks.oft"):
        generate(gen_files, tmp_path, "wrong", "--network_weights", gen_files["oft"])


# ------------------------------------------------------------------------------------------- 7. bad input


@pytest.mark.parametrize("kind, call, message", [
    ("lora_fa", dict(loraplus_lr_ratio="16"), "loraplus_lr_ratio: networks.lora_fa trains only the up"),
    ("lora_fa", dict(algo="lora"), "unknown key.*networks.lora_fa: algo"),
    ("dylora", dict(network_dim=6, unit="4"), "--network_dim 6 is not a multiple of --network_args unit=4"),
    ("dylora", dict(unit="two"), "unit='two': expected int"),
    ("dylora", dict(unit="0"), "unit=0: must be at least 1"),
    ("dylora", dict(conv_dim="8"), "conv_dim=8: DyLoRA gives 3x3 convolutions the network's rank"),
    ("dylora", dict(rank_dropout="0.1"), "unknown key.*networks.dylora: rank_dropout"),
    ("dylora", dict(neuron_dropout=0.1), "--network_dropout 0.1: networks.dylora has no dropout"),
    ("oft", dict(network_dim=3), "--network_dim 3 blocks of equal size, and 3 does not divide 32"),
    ("oft", dict(network_alpha=0.0), "--network_alpha 0.0: networks.oft reads network_alpha as the constraint"),
    ("oft", dict(enable_conv="maybe"), "enable_conv='maybe': expected True or False"),
    ("oft", dict(conv_dim="4"), "unknown key.*networks.oft: conv_dim"),
    ("oft", dict(neuron_dropout=0.1), "--network_dropout 0.1: networks.oft has no dropout"),
])
def test_bad_network_args_are_refused_by_name(kind, call, message):
    models = tiny()
    module = {"lora_fa": lora_fa, "dylora": dylora, "oft": oft}[kind]
    dim = call.pop("network_dim", 4)
    alpha = call.pop("network_alpha", 1e-2)
    with pytest.raises(ValueError, match=message):
        module.create_network(1.0, dim, alpha, None, models.text_encoder, models.unet, **call)


def test_dylora_file_ranks_must_be_multiples_of_the_unit(tmp_path):
    models = tiny()
    plain = lora.create_network(1.0, 6, 1, None, models.text_encoder, models.unet)
    with pytest.raises(ValueError, match="rank 6 is not a multiple of --network_args unit=4"):
        dylora.create_network_from_weights(1.0, None, None, models.text_encoder, models.unet,
                                           weights_sd=state(plain), unit="4")


def test_oft_is_refused_on_the_text_encoder_alone_and_reads_no_lora_file():
    models = tiny()
    network = make("oft", models)
    with pytest.raises(ValueError, match="trains the U-Net only.*--network_train_text_encoder_only"):
        network.apply_to(models.text_encoder, models.unet, apply_unet=False)
    plain = lora.create_network(1.0, 4, 1, None, models.text_encoder, models.unet)
    with pytest.raises(ValueError, match="not a kohya OFT file.*lora_te.*a LoRA\\? use networks.lora"):
        oft.create_network_from_weights(1.0, None, None, models.text_encoder, models.unet, weights_sd=state(plain))
    sdxl_names = {"oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.oft_blocks": torch.zeros(4, 8, 8),
                  "oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1e-3)}
    with pytest.raises(ValueError, match="names are those of a LoRA for SDXL"):
        oft.create_network_from_weights(1.0, None, None, models.text_encoder, models.unet, weights_sd=sdxl_names)


@pytest.mark.parametrize("argv, message", [
    (["--unit", "4"], "--unit 4 does not divide the rank of"),
    (["--unit", "2", "--rank", "3"], "--rank 3: each rank must be a multiple of --unit 2 from 2 to the file's rank 6"),
    (["--unit", "2", "--rank", "8"], "--rank 8: each rank must be a multiple"),
    ([], "records no DyLoRA unit; give --unit"),
    (["--unit", "6"], "rank 6 = --unit 6: there is no lower rank to extract"),
])
def test_extraction_errors_name_the_flag(tmp_path, capsys, argv, message):
    models = tiny()
    network = dylora.create_network(1.0, 6, 1, None, models.text_encoder, models.unet, unit="2")
    network.save_weights(tmp_path / "dy.safetensors", None, {})
    assert extract_lora_from_dylora.main(["--model", str(tmp_path / "dy.safetensors"), "--save_to",
                                          str(tmp_path / "o.safetensors"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("o-*"))
