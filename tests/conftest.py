"""Shared fixtures: tiny models of every family, built once per test session (no download ever)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Pin the suite to the CPU (also in the scripts it starts): on a GPU host accelerate, gen_img and the samplers would
# pick CUDA, and the golden numbers and tolerances are CPU measurements (tests/numerics.py). There are no GPU tests.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# The meta-model facts cache (library/meta_model_cache.py) of this test session only, shared with the scripts the
# tests start: tests neither read nor fill the user's ~/.cache.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ["SDTRAIN_META_CACHE"] = tempfile.mkdtemp(prefix="sdtrain_meta_test_")
atexit.register(shutil.rmtree, os.environ["SDTRAIN_META_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models are overhead-bound: one thread is as fast, and it keeps results bit-reproducible when other
# processes compete for the cores (multi-threaded CPU kernels may then split reductions differently).
torch.set_num_threads(1)

from library.families import FAMILIES, TEXT_TO_IMAGE  # noqa: E402

# The text-to-image families, which the family-parametrized tests and the tiny-model fixtures below cover. Their
# variants with other U-Net inputs (inpainting, depth, extra channels) have their own fixtures and the same checks in
# tests/test_families_extra_inputs.py.
FAMILY_NAMES = [name for name, family in FAMILIES.items() if family.unet_inputs == TEXT_TO_IMAGE]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (full-size models: minutes and several GB of RAM each)")


def pytest_collection_modifyitems(config, items):
    # Slow tests are opt-in: CI and the 2-core dev machines run the tiny-model suite only (see pytest.ini).
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow (full-size model); run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints():
    """family name -> SDCheckpoint of a tiny random model (SD 2.x with the original-only tensors)."""
    from library.tiny_models import tiny_checkpoint

    return {name: tiny_checkpoint(FAMILIES[name], seed=i) for i, name in enumerate(FAMILY_NAMES)}


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory, tiny_checkpoints):
    """family name -> {format name -> path} of the tiny models written in every format."""
    return write_every_format(tiny_checkpoints, tmp_path_factory.mktemp("tiny_models"))


def write_every_format(checkpoints: dict, root) -> dict:
    from library.checkpoint_writer import SaveFormat, save_checkpoint

    files = {}
    for name, checkpoint in checkpoints.items():
        files[name] = {
            "safetensors": save_checkpoint(checkpoint, root / f"{name}.safetensors", SaveFormat.SAFETENSORS),
            "ckpt": save_checkpoint(checkpoint, root / f"{name}.ckpt", SaveFormat.CKPT),
            "diffusers": save_checkpoint(checkpoint, root / f"{name}_diffusers", SaveFormat.DIFFUSERS),
            "diffusers_safetensors": save_checkpoint(checkpoint, root / f"{name}_diffusers_st",
                                                     SaveFormat.DIFFUSERS_SAFETENSORS),
        }
    return files


# The families whose U-Net takes more than the noisy latents (inpainting, depth, extra channels).
VARIANT_NAMES = [name for name in FAMILIES if name not in FAMILY_NAMES]


@pytest.fixture(scope="session")
def variant_checkpoints():
    """family name -> SDCheckpoint of a tiny random model of each variant family (with its original-only tensors:
    SD 2.x's text-encoder extras, SD 2.x depth's MiDaS stand-in)."""
    from library.tiny_models import tiny_checkpoint

    return {name: tiny_checkpoint(FAMILIES[name], seed=100 + i) for i, name in enumerate(VARIANT_NAMES)}


@pytest.fixture(scope="session")
def variant_files(tmp_path_factory, variant_checkpoints):
    """family name -> {format name -> path}: the variant families' tiny models written in every format."""
    return write_every_format(variant_checkpoints, tmp_path_factory.mktemp("tiny_variant_models"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state (mixed precision, process group) in a process-wide singleton; tests that run a
    trainer in-process each act as a new process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture
def images(tmp_path):
    """A folder of images for the captioning tools (make_captions.py, make_captions_by_git.py): three noise PNGs of
    different sizes at the top, a JPEG in a subfolder (for --recursive)."""
    import numpy as np
    from PIL import Image

    def noise(width: int, height: int, seed: int) -> Image.Image:
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        noise(24 + 8 * i, 20, seed=i).save(folder / f"img{i}.png")
    (folder / "sub").mkdir()
    noise(16, 16, seed=3).save(folder / "sub" / "deep.jpg")
    return folder
