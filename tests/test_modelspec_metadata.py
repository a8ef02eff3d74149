"""kohya's --metadata_* flags: each becomes `modelspec.<name>` in every model file the trainers write (LoRA, full
checkpoint, textual-inversion embedding, ControlNet), the thumbnail as a data: URL; bad values are refused by flag
before any work."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from library.safetensors_io import SafetensorsReader
from tests.recipe_helpers import run_script, tiny_workspace

FLAGS = ["--metadata_title", "Shapes v2", "--metadata_author", "The Team", "--metadata_description", "tiny shapes",
         "--metadata_license", "CC-BY-4.0", "--metadata_tags", "shape , tiny,,test", "--metadata_usage_hint",
         "say sks shape", "--metadata_merged_from", "a, b", "--metadata_trigger_phrase", "sks shape",
         "--metadata_preprocessor", "canny"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tiny_workspace(tmp_path_factory.mktemp("modelspec"), images=2, folder="2_sks shape")
    Image.new("RGB", (8, 6), (200, 10, 30)).save(root / "thumb.png")
    cond = root / "cond"
    cond.mkdir()
    for image in (root / "data" / "2_sks shape").glob("*.png"):
        Image.open(image).convert("L").convert("RGB").save(cond / image.name)
    return root


def common(root: Path, out: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "model", "--resolution", "64", "--max_train_steps", "1",
            "--train_batch_size", "1", "--max_data_loader_n_workers", "0", "--seed", "1",
            "--metadata_thumbnail", str(root / "thumb.png"), *FLAGS]


def metadata_of(path: Path) -> dict[str, str]:
    with SafetensorsReader(path) as reader:
        return dict(reader.metadata)


def assert_user_modelspec(metadata: dict[str, str], root: Path) -> None:
    assert metadata["modelspec.title"] == "Shapes v2" and metadata["modelspec.author"] == "The Team"
    assert metadata["modelspec.description"] == "tiny shapes" and metadata["modelspec.license"] == "CC-BY-4.0"
    assert metadata["modelspec.tags"] == "shape,tiny,test" and metadata["modelspec.usage_hint"] == "say sks shape"
    assert metadata["modelspec.merged_from"] == "a, b" and metadata["modelspec.trigger_phrase"] == "sks shape"
    assert metadata["modelspec.preprocessor"] == "canny"
    prefix = "data:image/png;base64,"
    assert metadata["modelspec.thumbnail"].startswith(prefix)
    png = base64.b64decode(metadata["modelspec.thumbnail"][len(prefix):])
    assert png == (root / "thumb.png").read_bytes() and Image.open(io.BytesIO(png)).size == (8, 6)
    assert metadata["modelspec.architecture"].startswith("stable-diffusion-v1")  # ours, untouched


@pytest.mark.parametrize("script,extra,saved", [
    ("train_network", ["--network_dim", "2"], "model.safetensors"),
    ("train_db", ["--save_model_as", "safetensors"], "model.safetensors"),
    ("train_textual_inversion", ["--token_string", "zq", "--init_word", "shape", "--use_object_template",
                                 "--save_model_as", "safetensors", "--metadata_is_negative_embedding", "True"],
     "model.safetensors"),
    ("train_controlnet", ["--save_model_as", "safetensors"], "model.safetensors"),
])
def test_every_trainer_writes_the_users_modelspec(workspace, script, extra, saved):
    if script == "train_controlnet":
        extra = extra + ["--conditioning_data_dir", str(workspace / "cond")]
    run_script(script, common(workspace, script) + extra)
    metadata = metadata_of(workspace / script / saved)
    assert_user_modelspec(metadata, workspace)
    if script == "train_textual_inversion":
        assert metadata["modelspec.is_negative_embedding"] == "true"


def test_the_title_defaults_to_the_file_name(workspace):
    argv = [a for a in common(workspace, "untitled") if a not in ("--metadata_title", "Shapes v2")]
    run_script("train_network", argv + ["--network_dim", "2", "--save_every_n_steps", "1", "--max_train_steps", "2"])
    assert metadata_of(workspace / "untitled" / "model.safetensors")["modelspec.title"] == "model"


@pytest.mark.parametrize("flags,needle", [
    (["--metadata_thumbnail", "nope.png"], "--metadata_thumbnail nope.png: no such image file"),
    (["--metadata_is_negative_embedding", "maybe"], "--metadata_is_negative_embedding maybe: give true or false"),
])
def test_bad_values_are_refused_before_any_work(workspace, flags, needle):
    argv = [a for a in common(workspace, "refused") if a not in ("--metadata_thumbnail", str(workspace / "thumb.png"))]
    with pytest.raises(SystemExit) as info:
        run_script("train_network", argv + flags)
    assert needle in str(info.value.code)
    assert not (workspace / "refused" / "model.safetensors").exists()
