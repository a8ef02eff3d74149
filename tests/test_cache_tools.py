"""tools/cache_latents.py and tools/cache_text_encoder_outputs.py fill the trainers' own caches ahead of time: a
training run afterwards (sdxl_train_network.py with both disk caches) finds every entry valid, never calls the VAE
encoder or a text encoder, and leaves the files as the tools wrote them. The instrumentation is checked on the tool
runs themselves (they do call the models). A trainer's config file works with the tools (its trainer-only keys
are skipped; a misspelt key is still an error), and what the tools cannot honour is refused by name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.recipe_helpers import run_script
from tools import cache_latents, cache_text_encoder_outputs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("cache_tools")
    write_dataset(root / "data", images=5, size=80, seed=2, folder="2_sks shape")
    for family in ("sdxl", "sd1"):
        assert make_model(["--family", family, str(root / f"{family}.safetensors")]) == 0
    return root


def data_flags(root: Path, model: str = "sdxl.safetensors") -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--train_data_dir", str(root / "data"),
            "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
            "--bucket_reso_steps", "32", "--flip_aug", "--caption_prefix", "photo of ", "--max_token_length", "150"]


@pytest.fixture
def model_calls(monkeypatch):
    """Calls of the VAE encoder and of the text encoders (CLIP ViT-L and OpenCLIP bigG), by kind."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    calls = {"vae": 0, "text": 0}
    for cls, kind, method in ((AutoencoderKL, "vae", "encode"), (CLIPTextModel, "text", "forward"),
                              (CLIPTextModelWithProjection, "text", "forward")):
        original = getattr(cls, method)

        def counting(self, *args, _original=original, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, counting)
    return calls


def cache_files(root: Path) -> dict[str, tuple[int, bytes]]:
    folder = root / "data" / "2_sks shape"
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("*.safetensors"))}


def test_training_reuses_every_entry(workspace, model_calls, caplog):
    root = workspace
    caplog.set_level(logging.INFO)
    assert cache_latents.main(data_flags(root) + ["--vae_batch_size", "2"]) == 0
    vae_calls = model_calls["vae"]
    assert vae_calls > 0 and model_calls["text"] == 0
    assert cache_text_encoder_outputs.main(data_flags(root) + ["--text_encoder_batch_size", "2"]) == 0
    assert model_calls["text"] > 0 and model_calls["vae"] == vae_calls
    written = cache_files(root)
    assert sum(name.endswith("_sd_latents.safetensors") for name in written) == 5
    assert sum(name.endswith("_te_outputs.safetensors") for name in written) == 5

    # A rerun of a tool keeps every entry.
    caplog.clear()
    assert cache_latents.main(data_flags(root)) == 0
    assert "5 of 5 entries read from disk, 0 to encode" in caplog.text

    model_calls.update(vae=0, text=0)
    run_script("sdxl_train_network", data_flags(root) + [
        "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only",
        "--output_dir", str(root / "out"), "--network_dim", "2", "--max_train_steps", "2", "--seed", "1",
        "--max_data_loader_n_workers", "0"])
    assert model_calls == {"vae": 0, "text": 0}
    assert "reused 5 entries from disk" in caplog.text and "stale" not in caplog.text
    assert cache_files(root) == written  # read, not rewritten
    assert (root / "out" / "last.safetensors").is_file()


def test_a_trainer_config_file_works(workspace, tmp_path, caplog):
    root = workspace
    config = tmp_path / "train.toml"
    config.write_text(f'''
[model]
pretrained_model_name_or_path = "{root / 'sd1.safetensors'}"
[dataset]
train_data_dir = "{root / 'data'}"
resolution = "64"
caption_extension = ".caption"
[training]
output_dir = "{tmp_path / 'out'}"
network_module = "networks.lora"
network_dim = 4
network_train_unet_only = true
learning_rate = 1e-4
''')
    caplog.set_level(logging.INFO)
    assert cache_text_encoder_outputs.main(["--config_file", str(config)]) == 0
    assert "network_dim, network_module, network_train_unet_only (flags of train_network.py) do not apply" \
        in caplog.text
    entries = sorted((root / "data" / "2_sks shape").glob("*_te_outputs.safetensors"))
    assert len(entries) == 5
    for entry in entries:  # the other test reads this folder
        entry.unlink()
    config.write_text(config.read_text() + "networkdim = 4\n")
    with pytest.raises(SystemExit, match="unknown argument.*networkdim"):
        cache_text_encoder_outputs.main(["--config_file", str(config)])


@pytest.mark.parametrize("tool,extra,needle", [
    (cache_latents, ["--flux", "--t5xxl", "t5.safetensors"], "--flux, --t5xxl: FLUX / SD3 options"),
    (cache_latents, ["--sdxl"], "--sdxl, but"),
    (cache_latents, ["--color_aug"], "cannot be used with random_crop or color_aug"),
    (cache_text_encoder_outputs, ["--pivotal_token", "sks"], "--pivotal_token trains its word"),
    (cache_text_encoder_outputs, ["--base_weights", "a.safetensors"], "--base_weights: train_network.py merges"),
    (cache_text_encoder_outputs, ["--shuffle_caption"], "--shuffle_caption"),
    (cache_text_encoder_outputs, ["--text_encoder_batch_size", "0"], "--text_encoder_batch_size must be"),
])
def test_refusals_name_the_flag(workspace, tool, extra, needle):
    with pytest.raises(SystemExit) as info:
        tool.main(data_flags(workspace, "sd1.safetensors") + extra)
    assert needle in str(info.value.code)
