"""Bad input to train_db.py / fine_tune.py: one clear error naming the culprit, before models load where possible,
and nothing written."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from tests.recipe_helpers import tiny_workspace
from tests.test_train_db import common_args, run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("train_db_bad"), images=3, folder="2_sks shape")


def expect_error(script: str, argv: list[str], *needles: str) -> str:
    with pytest.raises(SystemExit) as info:
        run(script, argv)
    message = str(info.value.code)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not [p for p in out.iterdir() if p.name != "logs"]


def db(root: Path, out: str, *extra: str) -> list[str]:
    return common_args(root, out) + ["--train_data_dir", str(root / "data"), "--max_train_steps", "1", *extra]


def test_class_prompt_without_reg_folder(workspace):
    expect_error("train_db", db(workspace, "o1", "--class_prompt", "shape"), "--class_prompt", "--reg_data_dir")
    assert_nothing_written(workspace / "o1")


def test_class_prompt_naming_an_impossible_folder(workspace):
    expect_error("train_db", db(workspace, "o2", "--class_prompt", "a/b", "--reg_data_dir", str(workspace / "r")),
                 "--class_prompt", "'a/b'", "/")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_reg_folder_not_writable_when_images_must_be_generated(workspace):
    reg = workspace / "readonly_reg"
    reg.mkdir()
    reg.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        expect_error("train_db", db(workspace, "o3", "--class_prompt", "shape", "--reg_data_dir", str(reg),
                                    "--num_class_images", "2"), str(reg), "not writable", "--num_class_images")
    finally:
        reg.chmod(stat.S_IRWXU)


def test_reg_folder_not_writable_is_checked_before_models_load(workspace, monkeypatch):
    """Root can write anywhere, so the permission check is driven through os.access (the function it uses)."""
    import library.class_images as class_images

    monkeypatch.setattr(class_images.os, "access", lambda path, mode: False)
    loaded = []
    import library.training_setup as setup

    monkeypatch.setattr(setup, "read_base_model", lambda args: loaded.append(args) or None)
    expect_error("train_db", db(workspace, "o4", "--class_prompt", "shape", "--reg_data_dir", str(workspace / "r4"),
                                "--num_class_images", "2"), "r4", "not writable", "--reg_data_dir")
    assert not loaded


def test_no_token_padding_with_long_captions(workspace):
    expect_error("train_db", db(workspace, "o5", "--no_token_padding", "--max_token_length", "150"),
                 "--no_token_padding", "--max_token_length")


def test_fused_backward_pass_refusals(workspace):
    expect_error("train_db", db(workspace, "o6", "--fused_backward_pass", "--optimizer_type", "Prodigy"),
                 "--fused_backward_pass", "Prodigy")
    expect_error("train_db", db(workspace, "o7", "--fused_backward_pass", "--gradient_accumulation_steps", "2"),
                 "--fused_backward_pass", "--gradient_accumulation_steps")
    assert_nothing_written(workspace / "o6")


# ----------------------------------------------------------------------------------------------------------
# fine_tune.py metadata


def ft(root: Path, out: str, meta: Path, *extra: str) -> list[str]:
    return common_args(root, out) + ["--train_data_dir", str(root / "data" / "2_sks shape"), "--in_json", str(meta),
                                     "--max_train_steps", "1", *extra]


def test_metadata_keys_matching_no_image(workspace):
    meta = workspace / "stale.json"
    entries = {"000": {"caption": "a"}, "gone_1": {"caption": "b"}, "gone_2": {"caption": "c"}}
    meta.write_text(json.dumps(entries))
    expect_error("fine_tune", ft(workspace, "o8", meta), str(meta), "2 of 3 entries match no image", "gone_1",
                 "gone_2")
    assert_nothing_written(workspace / "o8")


def test_metadata_not_valid_json(workspace):
    meta = workspace / "broken.json"
    meta.write_text('{\n  "000": {"caption": "a"},\n  "001": {"caption": "b"\n}\n')
    expect_error("fine_tune", ft(workspace, "o9", meta), str(meta), "invalid JSON at line 5 column 1")  # where the parser finds the missing brace


def test_images_without_metadata_entry_are_reported(workspace, caplog):
    meta = workspace / "partial.json"
    meta.write_text(json.dumps({"000": {"caption": "sks shape"}}))
    with caplog.at_level(logging.WARNING):
        run("fine_tune", ft(workspace, "o10", meta))
    assert any("2 image(s) have no metadata entry" in r.getMessage() and "001" in r.getMessage()
               for r in caplog.records)
    assert (workspace / "o10" / "model.safetensors").is_file()
