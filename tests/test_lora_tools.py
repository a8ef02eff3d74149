"""The LoRA / checkpoint tools (networks/merge_lora, svd_merge_lora, resize_lora, extract_lora_from_models,
check_lora_weights, tools/merge_models) on tiny SD 1.x models: numbers checked against LoRANetwork applied,
against PEFT (an independent implementation) and against direct torch.linalg.svd computations; every bad input
gives its message and writes nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import FAMILIES
from library.model_loading import checkpoint_from_models, instantiate_models
from library.safetensors_io import SafetensorsReader, save_tensors
from library.sd_checkpoint import read_checkpoint
from library.tiny_models import fresh_tiny_models
from networks import (check_lora_weights, extract_lora_from_models, merge_lora, resize_lora,  # noqa: F401
                      svd_merge_lora)
from networks.lora import create_network, create_network_from_weights, lora_targets, read_weights
from networks.lora_files import read_lora_file
from networks.lora_math import RankRule, rank_rule
from tests.numerics import FP64_OUTPUT_REL, assert_outputs_close
from tools import merge_models

REPO = Path(__file__).resolve().parent.parent
MULTIPLIER = 0.7
LOCON = {"conv_dim": "4", "conv_alpha": "1"}


# ------------------------------------------------------------------------------------------------ helpers


def tiny(family: str = "sd1", seed: int = 0):
    return fresh_tiny_models(family, seed)


def te_input(models):
    return models.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids


@torch.no_grad()
def outputs(models, dtype: torch.dtype = torch.float32):
    """(text-encoder output, U-Net output) on fixed inputs; the models must already be in `dtype`."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator).to(dtype)
    context = torch.randn(1, 77, models.unet.config.cross_attention_dim, generator=generator).to(dtype)
    return models.text_encoder(te_input(models)).last_hidden_state, models.unet(latents, 500, context).sample


def assert_same_outputs(merged, reference, *, base=None) -> None:
    """merged == reference (models with / without their LoRA networks as `.networks`).

    The weights are fp32 as stored; the comparison runs the forward twice: in fp32 (FP32_OUTPUT_REL: both sides'
    forward rounding) and in fp64 over the same fp32 weights (FP64_OUTPUT_REL: what is left is the merged weights'
    own fp32 rounding, so this is the bound that measures the merge)."""
    plain = outputs(base) if base is not None else None
    for got, want in zip(outputs(merged), outputs(reference)):
        assert_outputs_close(got, want, what="merged vs applied (fp32)")
    for models in (merged, reference):
        for module in (models.unet, models.text_encoder, *getattr(models, "networks", ())):
            module.double()
    for i, (got, want) in enumerate(zip(outputs(merged, torch.float64), outputs(reference, torch.float64))):
        if plain is not None:
            assert max_diff(want.float(), plain[i]) > 1e-3  # the LoRA matters...
        assert_outputs_close(got, want, what="merged vs applied (fp64)", rel=FP64_OUTPUT_REL)  # ...and merges


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """max |a - b| <= rel * max |b| (fp32 SVD / matmul rounding scales with the magnitude)."""
    scale = max(b.abs().max().item(), 1e-12)
    assert max_diff(a, b) <= rel * scale, f"{what}: max diff {max_diff(a, b):.3g}, magnitude {scale:.3g}"


def our_lora(path: Path, *, conv: bool, seed: int, dim: int = 4, alpha: float = 2, family: str = "sd1",
             metadata: dict | None = None, decay: float = 1.0) -> Path:
    """A LoRA written by our LoRANetwork (random lora_up, so it does something). `decay` < 1 scales rank i of
    lora_up by decay**i, for a spectrum that falls off as a trained LoRA's does."""
    models = tiny(family)
    kwargs = {"conv_dim": str(dim), "conv_alpha": "1"} if conv else {}
    torch.manual_seed(seed)
    network = create_network(1.0, dim, alpha, None, models.text_encoder, models.unet, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            up = torch.randn(module.lora_up.weight.shape, generator=generator) * 0.1
            falloff = decay ** torch.arange(module.lora_dim, dtype=torch.float32)
            module.lora_up.weight.copy_(up * falloff.reshape(1, -1, *[1] * (up.dim() - 2)))
    network.save_weights(path, None, metadata or {"ss_network_module": "networks.lora", "ss_base_model_version":
                                                  FAMILIES[family].ss_base_model_version})
    return path


UNET_PEFT_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_PEFT_CONV = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
TE_PEFT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peft_kohya_lora(path: Path, *, conv: bool, seed: int):
    """A kohya-format file made independently of our code: PEFT LoRA layers on the tiny models, exported with
    diffusers' convert_state_dict_to_kohya. Returns (path, models with the PEFT LoRA active at MULTIPLIER).

    diffusers' exporter names the text encoder `lora_te1_` (SDXL's first encoder) and, with transformers 5's
    CLIPTextModel, without the `text_model` level; SD 1.x files (kohya, WebUI) say `lora_te_text_model_`, so the
    prefix is renamed, exactly as the published format spells it."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    models = tiny()
    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so the LoRA is not a no-op
    unet_targets = UNET_PEFT_ATTENTION + (UNET_PEFT_CONV if conv else [])
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=unet_targets, init_lora_weights=False),
                            models.unet)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TE_PEFT, init_lora_weights=False),
                            models.text_encoder)
    peft_sd = {"unet." + k: v for k, v in get_peft_model_state_dict(models.unet).items()}
    peft_sd.update({"text_encoder." + k: v for k, v in get_peft_model_state_dict(models.text_encoder).items()})
    kohya = convert_state_dict_to_kohya(peft_sd)
    kohya = {k.replace("lora_te1_", "lora_te_text_model_"): v.contiguous() for k, v in kohya.items()}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)
    save_tensors(path, kohya)
    with torch.no_grad():  # PEFT's forward at the multiplier: scale every lora_B
        for model in (models.unet, models.text_encoder):
            for module in model.modules():
                if hasattr(module, "lora_B"):
                    module.lora_B["default"].weight.mul_(MULTIPLIER)
    return path, models


def applied(lora_files: list[Path], multipliers: list[float], family: str = "sd1"):
    """Fresh base models with our LoRANetwork(s) applied (not merged), the networks kept in `.networks`."""
    models = tiny(family)
    models.networks = []
    for file, multiplier in zip(lora_files, multipliers):
        network, _ = create_network_from_weights(multiplier, file, None, models.text_encoder, models.unet)
        network.load_weights(file)
        network.apply_to(models.text_encoder, models.unet)
        models.networks.append(network)
    return models


def load_model(path: Path):
    with read_checkpoint(path) as checkpoint:
        return instantiate_models(checkpoint)


def deltas(path: Path) -> dict[str, torch.Tensor]:
    return {name: f.delta() for name, f in read_lora_file(path).modules.items()}


def best_approximation(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(best rank-`rank` approximation, singular values), by a direct SVD of the full matrix (float64)."""
    U, S, Vh = torch.linalg.svd(delta.double().flatten(1), full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).reshape(delta.shape).float(), S


def metadata_of(path: Path) -> dict[str, str]:
    with SafetensorsReader(path) as reader:
        return dict(reader.metadata)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny SD 1.x base model as an original .safetensors and as a diffusers folder."""
    root = tmp_path_factory.mktemp("lora_tools")
    checkpoint = checkpoint_from_models(tiny())
    return {"safetensors": save_checkpoint(checkpoint, root / "base.safetensors", SaveFormat.SAFETENSORS),
            "diffusers": save_checkpoint(checkpoint, root / "base_diffusers", SaveFormat.DIFFUSERS_SAFETENSORS)}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"a": our_lora(root / "a.safetensors", conv=True, seed=1, metadata={"modelspec.title": "A",
                                                                               "ss_seed": "42"}),
            "b": our_lora(root / "b.safetensors", conv=True, seed=2),
            "attention": our_lora(root / "attention.safetensors", conv=False, seed=3)}


# ------------------------------------------------------------------------------ merge_lora: merge == apply


@pytest.mark.parametrize("source,conv,base_format,out_name", [
    ("ours", False, "safetensors", "merged.safetensors"),
    ("ours", True, "diffusers", "merged.ckpt"),
    ("kohya-from-peft", False, "safetensors", "merged_folder"),
    ("kohya-from-peft", True, "safetensors", "merged.safetensors"),
], ids=["ours-lora", "ours-locon", "peft-kohya-lora", "peft-kohya-locon"])
@pytest.mark.numbers
def test_merge_into_model_equals_apply(tmp_path, base, source, conv, base_format, out_name):
    peft_models = None
    if source == "ours":
        lora = our_lora(tmp_path / "lora.safetensors", conv=conv, seed=5)
    else:
        lora, peft_models = peft_kohya_lora(tmp_path / "lora.safetensors", conv=conv, seed=5)
    out = tmp_path / out_name
    assert merge_lora.main(["--sd_model", str(base[base_format]), "--models", str(lora), "--ratios", str(MULTIPLIER),
                            "--save_to", str(out)]) == 0
    merged = load_model(out)
    if peft_models is not None:  # PEFT's own forward agrees: an implementation independent of ours
        assert_same_outputs(load_model(out), peft_models)
    assert_same_outputs(merged, applied([lora], [MULTIPLIER]), base=tiny())
    if out.suffix == ".safetensors":
        assert metadata_of(out)["modelspec.merged_from"] == "base, lora"


@pytest.mark.numbers
def test_merge_several_loras_into_model(tmp_path, base, loras):
    kohya, _ = peft_kohya_lora(tmp_path / "kohya.safetensors", conv=True, seed=7)
    out = tmp_path / "merged.safetensors"
    files, ratios = [loras["attention"], kohya, loras["a"]], [0.8, -0.4, 0.5]
    assert merge_lora.main(["--sd_model", str(base["safetensors"]), "--models", *map(str, files), "--ratios",
                            *map(str, ratios), "--save_to", str(out), "--save_precision", "float"]) == 0
    assert_same_outputs(load_model(out), applied(files, ratios), base=tiny())
    metadata = metadata_of(out)
    assert metadata["modelspec.merged_from"] == "base, attention, kohya, A"
    assert metadata["modelspec.title"] == "merged" and metadata["modelspec.architecture"] == "stable-diffusion-v1"


@pytest.mark.numbers
def test_sd2_v_prediction_merge_and_merge_models(tmp_path):
    """SD 2.x (768-v, OpenCLIP text encoder with its original-only extra layer): merge == apply, and a weighted
    model merge keeps the family and merges the extras too."""
    base_path = save_checkpoint(checkpoint_from_models(tiny("sd2-768-v")), tmp_path / "sd2.safetensors",
                                SaveFormat.SAFETENSORS)
    lora = our_lora(tmp_path / "lora.safetensors", conv=True, seed=4, family="sd2-768-v")
    out = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--v2", "--sd_model", str(base_path), "--models", str(lora), "--ratios", str(MULTIPLIER),
                            "--save_to", str(out)]) == 0
    assert_same_outputs(load_model(out), applied([lora], [MULTIPLIER], family="sd2-768-v"), base=tiny("sd2-768-v"))
    assert metadata_of(out)["modelspec.prediction_type"] == "v"

    mixed = tmp_path / "mixed.safetensors"
    assert merge_models.main(["--models", str(base_path), str(out), "--ratios", "0.25", "0.75", "--output",
                              str(mixed)]) == 0
    with read_checkpoint(base_path) as first, read_checkpoint(out) as second, read_checkpoint(mixed) as result:
        assert result.family.name == "sd2-768-v" and result.extras.keys() == first.extras.keys()
        for key, lazy in result.extras.items():
            assert torch.equal(lazy.load(), 0.25 * first.extras[key].load() + 0.75 * second.extras[key].load())


# -------------------------------------------------------------------------------- merge_lora: LoRA + LoRA


def test_concat_is_the_exact_sum(tmp_path, loras):
    out = tmp_path / "concat.safetensors"
    assert merge_lora.main(["--models", str(loras["a"]), str(loras["b"]), "--ratios", "0.7", "-0.4", "--concat",
                            "--save_to", str(out)]) == 0
    a, b, got = deltas(loras["a"]), deltas(loras["b"]), deltas(out)
    assert got.keys() == a.keys()
    for name in a:
        assert_close(got[name], 0.7 * a[name] - 0.4 * b[name], what=name)
    assert {f.rank for f in read_lora_file(out).modules.values()} == {8}
    metadata = metadata_of(out)
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "4.0"  # alpha/rank kept (2/4)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "2.0"}
    assert metadata["modelspec.merged_from"] == "A, b" and metadata["modelspec.title"] == "concat"
    assert "ss_seed" not in metadata  # the first input's training details do not describe a merge

    shuffled = tmp_path / "shuffled.safetensors"  # --shuffle permutes ranks: the update stays the same
    assert merge_lora.main(["--models", str(loras["a"]), str(loras["b"]), "--ratios", "0.7", "-0.4", "--concat",
                            "--shuffle", "--save_to", str(shuffled)]) == 0
    for name, delta in deltas(shuffled).items():
        assert_close(delta, got[name], what=name)


def test_same_rank_merge_is_exact_when_the_sum_fits(tmp_path, loras):
    # One LoRA at two ratios: the sum 0.75 * ΔA has A's rank, so the same-rank merge is exact (.pt output).
    out = tmp_path / "aa.pt"
    assert merge_lora.main(["--models", str(loras["a"]), str(loras["a"]), "--ratios", "0.5", "0.25", "--save_to",
                            str(out)]) == 0
    a = deltas(loras["a"])
    for name, delta in deltas(out).items():
        assert_close(delta, 0.75 * a[name], what=name)
    assert {f.rank for f in read_lora_file(out).modules.values()} == {4}

    # Disjoint modules (a text-encoder LoRA + a U-Net LoRA): each is copied, scaled by its ratio.
    weights_a, weights_b = read_weights(loras["a"]), read_weights(loras["b"])
    save_tensors(tmp_path / "te.safetensors", {k: v for k, v in weights_a.items() if k.startswith("lora_te")})
    save_tensors(tmp_path / "unet.safetensors", {k: v for k, v in weights_b.items() if k.startswith("lora_unet")})
    out = tmp_path / "te_unet.safetensors"
    assert merge_lora.main(["--models", str(tmp_path / "te.safetensors"), str(tmp_path / "unet.safetensors"),
                            "--ratios", "1", "0.3", "--save_to", str(out)]) == 0
    b = deltas(loras["b"])
    for name, delta in deltas(out).items():
        assert_close(delta, a[name] if name.startswith("lora_te") else 0.3 * b[name], what=name)
    merged = read_weights(out)
    assert all(torch.equal(merged[k], v) for k, v in weights_a.items() if k.startswith("lora_te"))  # ratio 1: as is


def test_same_rank_merge_of_different_loras_is_the_best_approximation(loras):
    a_file, b_file = read_lora_file(loras["a"]), read_lora_file(loras["b"])
    modules, retention = merge_lora.merge_lora_files([a_file, b_file], [0.7, 0.5])
    a, b = deltas(loras["a"]), deltas(loras["b"])
    assert retention.keys() == a.keys()
    for name, factors in modules.items():
        best, S = best_approximation(0.7 * a[name] + 0.5 * b[name], 4)
        assert factors.rank == 4 and factors.alpha == a_file.modules[name].alpha
        assert_close(factors.delta(), best, what=name)
        fro = math.sqrt(float(S[:4].pow(2).sum() / S.pow(2).sum()))
        assert retention[name].fro_retained == pytest.approx(fro, abs=1e-6)
        assert retention[name].fro_retained < 0.99  # two random rank-4 updates do not fit in rank 4


# ------------------------------------------------------------------------------------------ svd_merge_lora


def test_svd_merge_at_full_rank_is_the_sum_and_lower_ranks_are_the_best_approximation(tmp_path, loras):
    a, b = deltas(loras["a"]), deltas(loras["b"])
    full = tmp_path / "full.safetensors"
    assert svd_merge_lora.main(["--models", str(loras["a"]), str(loras["b"]), "--ratios", "0.7", "-0.4",
                                "--new_rank", "8", "--new_conv_rank", "8", "--clamp_quantile", "1",
                                "--save_to", str(full)]) == 0
    for name, delta in deltas(full).items():
        assert_close(delta, 0.7 * a[name] - 0.4 * b[name], what=name)
    assert all(f.alpha == f.rank for f in read_lora_file(full).modules.values())  # kohya: alpha = rank

    low = tmp_path / "low.safetensors"
    assert svd_merge_lora.main(["--models", str(loras["a"]), str(loras["b"]), "--ratios", "0.7", "-0.4",
                                "--new_rank", "2", "--new_conv_rank", "3", "--clamp_quantile", "1",
                                "--save_to", str(low)]) == 0
    low_lora = read_lora_file(low)
    for name, factors in low_lora.modules.items():
        rank = 3 if factors.is_kxk_conv else 2
        best, _ = best_approximation(0.7 * a[name] - 0.4 * b[name], rank)
        assert factors.rank == rank
        assert_close(factors.delta(), best, what=name)
    metadata = metadata_of(low)
    assert metadata["ss_network_dim"] == "2" and json.loads(metadata["ss_network_args"])["conv_dim"] == "3"

    clamped = tmp_path / "clamped.safetensors"  # kohya's default clipping changes the result a little
    assert svd_merge_lora.main(["--models", str(loras["a"]), "--new_rank", "4", "--new_conv_rank", "4",
                                "--save_to", str(clamped)]) == 0
    relative = [max_diff(d, a[n]) / a[n].abs().max().item() for n, d in deltas(clamped).items()]
    assert 0 < max(relative) < 0.5


# --------------------------------------------------------------------------------------------- resize_lora


@pytest.fixture(scope="module")
def rank8(tmp_path_factory):
    path = tmp_path_factory.mktemp("rank8") / "rank8.safetensors"
    return our_lora(path, conv=True, seed=11, dim=8, alpha=4, decay=0.7,
                    metadata={"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
                              "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "1", "dropout": "0.1"}),
                              "ss_seed": "42", "sshs_model_hash": "stale"})


def test_resize_to_full_rank_is_lossless(tmp_path, rank8):
    out = tmp_path / "same.safetensors"
    assert resize_lora.main(["--model", str(rank8), "--new_rank", "8", "--save_to", str(out)]) == 0
    before = deltas(rank8)
    for name, delta in deltas(out).items():
        assert_close(delta, before[name], what=name)
    metadata = metadata_of(out)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "4.0")
    assert json.loads(metadata["ss_network_args"]) == {"dropout": "0.1", "conv_dim": "8", "conv_alpha": "1.0"}
    assert metadata["ss_seed"] == "42" and metadata["sshs_model_hash"] != "stale"  # carried over; hash recomputed

    half = tmp_path / "half.safetensors"
    assert resize_lora.main(["--model", str(rank8), "--new_rank", "8", "--save_precision", "fp16",
                             "--save_to", str(half)]) == 0
    assert {v.dtype for v in read_weights(half).values()} == {torch.float16}


def test_resize_to_lower_rank_reports_retention_like_a_direct_svd(tmp_path, rank8, capsys):
    lora = read_lora_file(rank8)
    modules, report = resize_lora.resize_modules(lora.modules, RankRule(3), RankRule(2))
    for name, factors in lora.modules.items():
        rank = 2 if factors.is_kxk_conv else 3
        best, S = best_approximation(factors.delta(), rank)
        assert modules[name].rank == rank
        assert modules[name].scale == pytest.approx(factors.scale)  # alpha / rank kept: same strength
        assert_close(modules[name].delta(), best, what=name)
        S = S.double()
        r = report[name]
        assert r.fro_retained == pytest.approx(math.sqrt(float(S[:rank].pow(2).sum() / S.pow(2).sum())), abs=1e-6)
        assert r.sum_retained == pytest.approx(float(S[:rank].sum() / S.sum()), abs=1e-6)
        assert r.max_ratio == pytest.approx(float(S[0] / S[rank - 1]), rel=1e-5)

    out = tmp_path / "small.safetensors"
    assert resize_lora.main(["--model", str(rank8), "--new_rank", "3", "--new_conv_rank", "2", "--verbose",
                             "--save_to", str(out)]) == 0
    printed = capsys.readouterr().out
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    line = next(line for line in printed.splitlines() if line.startswith(name + " "))
    assert f"fro retained: {report[name].fro_retained:.1%}" in line
    mean = sum(r.fro_retained for r in report.values()) / len(report)
    assert f"Average Frobenius norm retention: {mean:.2%}" in printed
    metadata = metadata_of(out)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("3", "1.5")
    assert json.loads(metadata["ss_network_args"])["conv_dim"] == "2"
    assert metadata["ss_training_comment"].startswith("dimension is resized from 8 to 3 (conv: 2)")


def direct_rank(S: torch.Tensor, method: str, param: float, limit: int) -> int:
    """The dynamic rules written out plainly, on singular values from a direct SVD."""
    S = S.double()
    ranks = range(1, len(S) + 1)
    if method == "sv_ratio":
        rank = int((S >= S[0] / param).sum())
    elif method == "sv_fro":
        rank = next(r for r in ranks if math.sqrt(float(S[:r].pow(2).sum() / S.pow(2).sum())) >= param - 1e-12)
    else:
        rank = next(r for r in ranks if float(S[:r].sum() / S.sum()) >= param - 1e-12)
    return max(1, min(rank, limit))


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_ratio", 3.0)])
def test_resize_dynamic_methods(tmp_path, rank8, method, param):
    out = tmp_path / "dynamic.safetensors"
    assert resize_lora.main(["--model", str(rank8), "--new_rank", "6", "--dynamic_method", method,
                             "--dynamic_param", str(param), "--save_to", str(out)]) == 0
    resized = read_lora_file(out).modules
    ranks = set()
    for name, factors in read_lora_file(rank8).modules.items():
        _, S = best_approximation(factors.delta(), 1)
        expected = direct_rank(S[:factors.rank], method, param, 6)
        assert resized[name].rank == expected, name
        assert resized[name].alpha == pytest.approx(factors.scale * expected)
        ranks.add(expected)
    assert len(ranks) > 1  # the rule chose different ranks for different modules
    metadata = metadata_of(out)
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_network_alpha"] == "Dynamic"
    assert metadata["ss_training_comment"].startswith(f"Dynamic resize with {method}: {param} from 8")


# --------------------------------------------------------------------------------- extract_lora_from_models


@pytest.mark.numbers
def test_extract_at_full_rank_reproduces_the_difference(tmp_path, base):
    original, tuned = tiny(), tiny()
    generator = torch.Generator().manual_seed(21)
    te_targets, unet_targets = lora_targets(tuned.text_encoder, tuned.unet, conv=True)
    with torch.no_grad():  # fine-tune every layer a LoRA (with LoCon) can express, and nothing else
        for module in [*te_targets.values(), *unet_targets.values()]:
            module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.05)
    tuned_path = save_checkpoint(checkpoint_from_models(tuned), tmp_path / "tuned", SaveFormat.DIFFUSERS)
    out = tmp_path / "extracted.safetensors"
    assert extract_lora_from_models.main(["--model_org", str(base["safetensors"]), "--model_tuned", str(tuned_path),
                                          "--dim", "64", "--conv_dim", "64", "--clamp_quantile", "1",
                                          "--min_diff", "0", "--save_to", str(out)]) == 0
    extracted = deltas(out)
    original_targets = {}
    for targets in lora_targets(original.text_encoder, original.unet, conv=True):
        original_targets.update(targets)
    expected = {name: module.weight - original_targets[name].weight
                for name, module in {**te_targets, **unet_targets}.items()}
    assert extracted.keys() == expected.keys()
    for name, delta in extracted.items():
        assert_close(delta, expected[name].detach().reshape(delta.shape), what=name)
    metadata = metadata_of(out)
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["modelspec.architecture"] == \
        "stable-diffusion-v1/lora"
    assert metadata["ss_training_comment"] == "extracted: tuned - base"

    # End to end: the original plus the extracted LoRA is the tuned model.
    merged = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--sd_model", str(base["safetensors"]), "--models", str(out), "--save_to",
                            str(merged)]) == 0
    for got, want in zip(outputs(load_model(merged)), outputs(tuned)):
        assert_outputs_close(got, want, what="base + extracted LoRA vs tuned")

    # --min_diff above the text encoder's largest change: U-Net only; without --conv_dim: attention layers only.
    unet_only = tmp_path / "unet_only.safetensors"
    assert extract_lora_from_models.main(["--model_org", str(base["safetensors"]), "--model_tuned", str(tuned_path),
                                          "--dim", "2", "--min_diff", "10", "--save_to", str(unet_only)]) == 0
    names = set(read_lora_file(unet_only).modules)
    assert names and all(n.startswith("lora_unet_") and "resnets" not in n for n in names)


# ---------------------------------------------------------------------------------------- merge_models


def test_merge_models_weighted_sum_is_exact(tmp_path):
    checkpoints = [checkpoint_from_models(tiny(seed=s)) for s in (0, 1, 2)]
    paths = [save_checkpoint(checkpoints[0], tmp_path / "m0.safetensors", SaveFormat.SAFETENSORS),
             save_checkpoint(checkpoints[1], tmp_path / "m1.ckpt", SaveFormat.CKPT),
             save_checkpoint(checkpoints[2], tmp_path / "m2", SaveFormat.DIFFUSERS)]
    ratios = [0.5, 0.3, 0.2]
    out = tmp_path / "merged.safetensors"
    assert merge_models.main(["--models", *map(str, paths), "--ratios", *map(str, ratios), "--output", str(out)]) == 0
    with read_checkpoint(out) as merged:
        for component, tensors in merged.tensors.items():
            for key, lazy in tensors.items():
                parts = [c.tensors[component][key].load() for c in checkpoints]
                expected = 0.5 * parts[0] + 0.3 * parts[1] + 0.2 * parts[2]
                assert torch.equal(lazy.load(), expected), key
        assert merged.metadata["modelspec.merged_from"] == "m0, m1, m2"

    unet_only = tmp_path / "unet_only"  # no suffix: a diffusers folder
    assert merge_models.main(["--models", *map(str, paths[:2]), "--unet_only", "--output", str(unet_only)]) == 0
    with read_checkpoint(unet_only) as merged:
        for component, tensors in merged.tensors.items():
            for key, lazy in tensors.items():
                first, second = (c.tensors[component][key].load() for c in checkpoints[:2])
                expected = 0.5 * first + 0.5 * second if component == "unet" else first
                assert torch.equal(lazy.load(), expected), key


# ------------------------------------------------------------------------------------ check_lora_weights


def test_check_lora_weights_flags_zero_and_nan_modules(tmp_path, loras, capsys):
    weights = read_weights(loras["attention"])
    zero = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    nan = "lora_unet_mid_block_attentions_0_proj_in"
    weights[f"{zero}.lora_up.weight"] = torch.zeros_like(weights[f"{zero}.lora_up.weight"])
    weights[f"{nan}.lora_up.weight"] = weights[f"{nan}.lora_up.weight"].clone()
    weights[f"{nan}.lora_up.weight"][0, 0] = float("nan")
    weights["lora_unet_mid_block_attentions_0_proj_out.hada_w1_a"] = torch.ones(2, 2)
    save_tensors(tmp_path / "broken.safetensors", weights)
    assert check_lora_weights.main([str(tmp_path / "broken.safetensors")]) == 1
    printed = capsys.readouterr().out
    assert f"{zero}: ZERO (lora_up is all zeros" in printed
    assert f"{nan}: NaN in lora_up" in printed
    assert "1 key(s) outside kohya's LoRA layout" in printed and "hada_w1_a" in printed
    row = next(line for line in printed.splitlines() if line.startswith(f"{zero}.lora_down.weight "))
    assert row.split()[1:3] == ["4x32", "float32"]

    # As a script (the only subprocess in this file: imports cost seconds).
    result = subprocess.run([sys.executable, str(REPO / "networks" / "check_lora_weights.py"), str(loras["a"])],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "OK: 289 modules, 289 alphas, 0 flagged" in result.stdout


# ------------------------------------------------------------------------------ bundled embeddings (bundle_emb.*)


def test_bundled_embeddings_are_kept_aside_and_carried(tmp_path, base, loras, caplog, capsys):
    """A LoRA with embeddings inside (train_network --bundle_embeddings; WebUI's bundle_emb.* keys, the one-encoder
    form and SDXL's clip_l / clip_g form): every reader takes the network from it exactly as from the plain file,
    the tools whose output is still that LoRA carry the embeddings byte for byte, and a merge into a checkpoint
    (no place for new words) says which it leaves out."""
    import logging

    generator = torch.Generator().manual_seed(3)
    bundle = {"bundle_emb.zwxq.string_to_param.*": torch.randn(2, 32, generator=generator),
              "bundle_emb.qxvz.clip_l": torch.randn(1, 32, generator=generator),
              "bundle_emb.qxvz.clip_g": torch.randn(1, 48, generator=generator)}
    plain = read_weights(loras["attention"])
    bundled = tmp_path / "bundled.safetensors"
    save_tensors(bundled, {**plain, **bundle}, metadata_of(loras["attention"]))

    lora = read_lora_file(bundled)
    assert lora.modules.keys() == read_lora_file(loras["attention"]).modules.keys()
    assert lora.bundled.keys() == bundle.keys() and all(torch.equal(lora.bundled[k], v) for k, v in bundle.items())
    models = tiny()
    network, weights = create_network_from_weights(1.0, str(bundled), None, models.text_encoder, models.unet)
    assert weights.keys() == plain.keys() and all(torch.equal(weights[k], v) for k, v in plain.items())
    assert check_lora_weights.main([str(bundled)]) == 0
    assert "bundled embedding(s) qxvz, zwxq:" in capsys.readouterr().out

    resized = tmp_path / "resized.safetensors"
    assert resize_lora.main(["--model", str(bundled), "--new_rank", "2", "--save_to", str(resized)]) == 0
    merged = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--models", str(bundled), str(loras["b"]), "--ratios", "0.5", "0.5", "--concat",
                            "--save_to", str(merged)]) == 0
    svd_merged = tmp_path / "svd_merged.safetensors"
    assert svd_merge_lora.main(["--models", str(bundled), "--ratios", "0.5", "--new_rank", "2", "--save_to",
                                str(svd_merged)]) == 0
    for out in (resized, merged, svd_merged):
        carried = read_lora_file(out).bundled
        assert carried.keys() == bundle.keys() and all(torch.equal(carried[k], v) for k, v in bundle.items()), out

    caplog.set_level(logging.WARNING)
    assert merge_lora.main(["--sd_model", str(base["safetensors"]), "--models", str(bundled), "--save_to",
                            str(tmp_path / "model.safetensors")]) == 0
    assert "bundles the embedding(s) qxvz, zwxq" in caplog.text and "not in it" in caplog.text


# ------------------------------------------------------------------------------------------- bad inputs


def run_tool(tool, argv: list[str], capsys) -> str:
    """Run a tool that must fail: exit status 2, the message on stderr."""
    assert tool.main(argv) == 2
    return capsys.readouterr().err


def test_lora_for_another_family_reports_how_many_modules_match(tmp_path, base, capsys):
    sd2 = our_lora(tmp_path / "sd2.safetensors", conv=False, seed=1, family="sd2-512")
    out = tmp_path / "out.safetensors"
    err = run_tool(merge_lora, ["--sd_model", str(base["safetensors"]), "--models", str(sd2), "--save_to", str(out)],
                   capsys)
    # 12 text-encoder modules (width 48, not 32) and 32 attn2 to_k / to_v (context 48, not 32) do not fit.
    assert "sd2.safetensors does not fit this model (Stable Diffusion 1.x" in err
    assert "160 of 204 LoRA modules match a layer of it" in err and "44 module(s) have the wrong shape" in err
    assert "ss_base_model_version=sd_v2" in err
    assert not out.exists()

    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4)}
    save_tensors(tmp_path / "sdxl.safetensors", sdxl)
    err = run_tool(merge_lora, ["--sd_model", str(base["safetensors"]), "--models", str(tmp_path / "sdxl.safetensors"),
                                "--save_to", str(out)], capsys)
    assert "0 of 2 LoRA modules match" in err and "2 module(s) name no layer" in err and "SDXL" in err

    # Two LoRAs for different families cannot be merged into one either.
    err = run_tool(merge_lora, ["--models", str(our_lora(tmp_path / "sd1.safetensors", conv=False, seed=1)),
                                str(sd2), "--save_to", str(out)], capsys)
    assert "these LoRAs are for different models" in err and "sd_v1, sd_v2" in err


def test_unknown_and_incomplete_keys_are_listed(tmp_path, base, loras, capsys):
    weights = read_weights(loras["attention"])
    foreign = dict(weights, **{"lora_unet_mid_block_attentions_0_proj_out.hada_w1_a": torch.zeros(2, 2),
                               "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 2)})
    save_tensors(tmp_path / "foreign.safetensors", foreign)
    out = tmp_path / "out.safetensors"
    for tool, argv in ((merge_lora, ["--sd_model", str(base["safetensors"])]), (resize_lora, [])):
        flag = "--models" if tool is merge_lora else "--model"
        err = run_tool(tool, argv + [flag, str(tmp_path / "foreign.safetensors"), "--save_to", str(out)], capsys)
        assert "2 key(s) not in kohya's LoRA layout" in err
        assert "lora_unet_mid_block_attentions_0_proj_out.hada_w1_a" in err and "lora_A.weight" in err
        assert "LyCORIS" in err and "PEFT" in err
    incomplete = {k: v for k, v in weights.items() if k != "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"}
    save_tensors(tmp_path / "incomplete.safetensors", incomplete)
    err = run_tool(resize_lora, ["--model", str(tmp_path / "incomplete.safetensors"), "--save_to", str(out)], capsys)
    assert "lora_unet_mid_block_attentions_0_proj_out: has alpha, down but no lora_up" in err
    err = run_tool(merge_lora, ["--sd_model", str(base["safetensors"]), "--models", str(base["safetensors"]),
                                "--save_to", str(out)], capsys)
    assert "a Stable Diffusion checkpoint, not a LoRA" in err
    err = run_tool(merge_lora, ["--sd_model", str(loras["a"]), "--models", str(loras["a"]), "--save_to", str(out)],
                   capsys)
    assert "this is a LoRA file, not a Stable Diffusion checkpoint" in err
    assert not out.exists()


def test_ratio_count_must_match_model_count(tmp_path, base, loras, capsys):
    out = tmp_path / "out.safetensors"
    two = [str(loras["a"]), str(loras["b"])]
    for tool, argv in ((merge_lora, ["--models", *two, "--ratios", "0.5"]),
                       (merge_lora, ["--sd_model", str(base["safetensors"]), "--models", *two, "--ratios", "1", "2",
                                     "3"]),
                       (svd_merge_lora, ["--models", *two, "--ratios", "0.5"])):
        err = run_tool(tool, argv + ["--save_to", str(out)], capsys)
        assert "--ratios" in err and "ratio(s) for 2 model(s)" in err
    err = run_tool(merge_models, ["--models", str(base["safetensors"]), str(base["diffusers"]), "--ratios", "1",
                                  "--output", str(out)], capsys)
    assert "1 ratio(s) for 2 model(s)" in err
    assert not out.exists()


def test_rank_larger_than_any_layer_allows(tmp_path, base, loras, rank8, capsys):
    out = tmp_path / "out.safetensors"
    err = run_tool(resize_lora, ["--model", str(rank8), "--new_rank", "1000", "--save_to", str(out)], capsys)
    assert "--new_rank 1000 is larger than any layer here allows" in err and "largest such limit is 64" in err
    err = run_tool(svd_merge_lora, ["--models", str(loras["a"]), "--new_rank", "4", "--new_conv_rank", "5000",
                                    "--save_to", str(out)], capsys)
    assert "--new_conv_rank 5000 is larger than any layer here allows" in err
    err = run_tool(extract_lora_from_models, ["--model_org", str(base["safetensors"]), "--model_tuned",
                                              str(base["diffusers"]), "--dim", "65", "--save_to", str(out)], capsys)
    assert "--dim 65 is larger than any layer here allows" in err and "largest such limit is 64" in err
    err = run_tool(resize_lora, ["--model", str(rank8), "--new_rank", "0", "--save_to", str(out)], capsys)
    assert "--new_rank 0: the rank must be at least 1" in err
    assert not out.exists()


def test_nan_weights_are_refused(tmp_path, base, loras, capsys):
    weights = read_weights(loras["a"])
    bad = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
    weights[f"{bad}.lora_down.weight"] = torch.full_like(weights[f"{bad}.lora_down.weight"], float("nan"))
    save_tensors(tmp_path / "nan.safetensors", weights)
    out = tmp_path / "out.safetensors"
    for tool, argv in ((merge_lora, ["--sd_model", str(base["safetensors"]), "--models"]),
                       (merge_lora, ["--models", str(loras["b"])]), (svd_merge_lora, ["--models"]),
                       (resize_lora, ["--model"])):
        err = run_tool(tool, argv + [str(tmp_path / "nan.safetensors"), "--save_to", str(out)], capsys)
        assert "1 module(s) hold NaN or Inf values" in err and bad in err
    models = tiny()
    with torch.no_grad():
        models.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    broken = save_checkpoint(checkpoint_from_models(models), tmp_path / "broken.safetensors", SaveFormat.SAFETENSORS)
    err = run_tool(merge_models, ["--models", str(base["safetensors"]), str(broken), "--output", str(out)], capsys)
    assert "broken.safetensors: conv_in.weight holds NaN / Inf values" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # the atomic write left nothing behind


def test_other_bad_inputs(tmp_path, base, loras, capsys):
    out = tmp_path / "out.safetensors"
    for argv, message in (
            (["--dynamic_method", "sv_fro"], "--dynamic_method sv_fro needs --dynamic_param"),
            (["--dynamic_method", "sv_fro", "--dynamic_param", "1.5"], "fraction to retain, in (0, 1]"),
            (["--dynamic_method", "sv_ratio", "--dynamic_param", "0.5"], "param must be >= 1")):
        assert message in run_tool(resize_lora, ["--model", str(loras["a"]), "--save_to", str(out)] + argv, capsys)
    with pytest.raises(Exception, match="needs --dynamic_param"):
        rank_rule(4, "sv_cumulative", None)
    rank2 = our_lora(tmp_path / "rank2.safetensors", conv=False, seed=1, dim=2)
    err = run_tool(merge_lora, ["--models", str(loras["attention"]), str(rank2), "--save_to", str(out)], capsys)
    assert "have different ranks in different inputs" in err and "ranks 4, 2" in err and "--concat" in err
    err = run_tool(resize_lora, ["--model", str(loras["a"]), "--save_to", str(tmp_path / "out.txt")], capsys)
    assert "--save_to" in err and ".safetensors" in err
    sd2 = save_checkpoint(checkpoint_from_models(tiny("sd2-512")), tmp_path / "sd2.safetensors",
                          SaveFormat.SAFETENSORS)
    err = run_tool(merge_models, ["--models", str(base["safetensors"]), str(sd2), "--output", str(out)], capsys)
    assert "models of different families cannot be combined" in err
    err = run_tool(extract_lora_from_models, ["--model_org", str(base["safetensors"]), "--model_tuned", str(sd2),
                                              "--save_to", str(out)], capsys)
    assert "models of different families cannot be combined" in err
    err = run_tool(merge_lora, ["--sd_model", str(base["safetensors"]), "--models", str(loras["a"]), "--v2",
                                "--save_to", str(out)], capsys)
    assert "--v2 was given, but the weights are an SD 1.x model" in err
    assert not out.exists()
