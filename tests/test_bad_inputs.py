"""Bad inputs: every one fails with our exception type (or exit code 2 from the convert tool), a message that
names the offending file / key and says what to do, and no partial output on disk (an existing output file is
left byte-identical).

All variants are built from the tiny models in `tmp_path`; diffusers folders are copied as symlinks to the
fixture's weight files, and a file that a test changes is unlinked and rewritten (never written through a link).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import random
import shutil
from pathlib import Path

import pytest
import torch

from library.atomic_files import OutputPathError, check_writable_output
from library.model_loading import read_vae, replace_vae
from library.safetensors_io import SafetensorsReader, save_tensors
from library.sd_checkpoint import FamilyHints, read_checkpoint
from library.tensor_files import CheckpointError, UnsafePickleError, open_tensor_file

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools" / "convert_diffusers20_original_sd.py")
convert_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_tool)

PREVIOUS_OUTPUT = b"previous output - must survive a failed conversion"
UNET_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
TE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.layer_norm2.weight"


# ----------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def sd1_tensors(tiny_files):
    """(tensors, metadata) of the tiny SD 1.x original safetensors file, read once."""
    with SafetensorsReader(tiny_files["sd1"]["safetensors"]) as reader:
        return {k: reader.read(k) for k in reader.keys()}, dict(reader.metadata)


def write_variant(path: Path, sd1_tensors, *, drop=(), add=None, metadata=None) -> Path:
    tensors, meta = sd1_tensors
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    tensors.update(add or {})
    save_tensors(path, tensors, meta if metadata is None else metadata)
    return path


def linked_copy(src: Path, dst: Path) -> Path:
    """A diffusers folder whose files are symlinks to `src`'s (cheap); see `replace_file`."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def replace_file(path: Path, data: bytes | str) -> None:
    path.unlink()  # never write through the symlink into the session fixture
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def digest(path: Path) -> str:
    """Hash of a file, or of every file (name and bytes) under a folder."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def leftovers(dest: Path) -> list[str]:
    """Temporary or moved-aside siblings the atomic writers would leave after a crash."""
    if not dest.parent.is_dir():
        return []
    return sorted(p.name for p in dest.parent.glob(f".{dest.name}.*"))


def assert_nothing_written(dest: Path, previous: bytes | None) -> None:
    if previous is None:
        assert not dest.exists() and not dest.is_symlink(), f"{dest} was created"
    else:
        assert dest.read_bytes() == previous, f"{dest} was changed"
    assert leftovers(dest) == []


def convert_fails(capsys, *args, out: Path, existing: bool = True) -> str:
    """Run the convert tool, expect exit code 2 with `error: ...` on stderr and no output; return stderr."""
    if existing:
        out.write_bytes(PREVIOUS_OUTPUT)
    capsys.readouterr()
    code = convert_tool.main([str(a) for a in args] + [str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: " in err
    assert "Traceback" not in err
    assert_nothing_written(out, PREVIOUS_OUTPUT if existing else None)
    return err


def raises_naming(exc_type, call, *needles: str) -> str:
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    return message


# ----------------------------------------------------------------------------------------------------------
# 1. Missing file


@pytest.mark.parametrize("existing", [False, True])
def test_missing_file(tmp_path, capsys, existing):
    path = tmp_path / "no_such_model.safetensors"
    raises_naming(CheckpointError, lambda: read_checkpoint(path), "no_such_model.safetensors", "no such file",
                  "Check the path")
    raises_naming(CheckpointError, lambda: open_tensor_file(path), "no_such_model.safetensors", "Check the path")
    err = convert_fails(capsys, path, out=tmp_path / "out.safetensors", existing=existing)
    assert "no_such_model.safetensors" in err and "Check the path" in err


# ----------------------------------------------------------------------------------------------------------
# 2. A folder that is not a diffusers pipeline


def _empty_dir(tmp_path, tiny_files):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", ["not a diffusers model folder"]


def _random_files_dir(tmp_path, tiny_files):
    folder = tmp_path / "random"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "weights.bin").write_bytes(os.urandom(256))
    (folder / "config.json").write_text("{}")
    return folder, ["not a diffusers model folder"]


def _component_dir(fmt):
    def make(tmp_path, tiny_files):
        pipeline = linked_copy(tiny_files["sd1"][fmt], tmp_path / "pipeline")
        return pipeline / "unet", ["a single diffusers model", "not a whole pipeline", str(pipeline)]
    return make


@pytest.mark.parametrize("make", [_empty_dir, _random_files_dir, _component_dir("diffusers_safetensors"),
                                  _component_dir("diffusers")],
                         ids=["empty", "random_files", "unet_component_safetensors", "unet_component_bin"])
def test_folder_that_is_not_a_pipeline(tmp_path, tiny_files, capsys, make):
    folder, needles = make(tmp_path, tiny_files)
    raises_naming(CheckpointError, lambda: read_checkpoint(folder), str(folder), "model_index.json",
                  "Point at the pipeline folder", *needles)
    err = convert_fails(capsys, folder, out=tmp_path / "out.safetensors")
    assert str(folder) in err and "model_index.json" in err


# ----------------------------------------------------------------------------------------------------------
# 3. Damaged safetensors


def _truncated(path: Path, source: Path) -> list[str]:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut in the middle of the tensor data
    return ["truncated", "fetch it again"]


def _bad_header_json(path: Path, source: Path) -> list[str]:
    data = bytearray(source.read_bytes())
    data[8:20] = b"#not json!#}"
    path.write_bytes(bytes(data))
    return ["not valid JSON", "fetch it again"]


def _absurd_header_length(path: Path, source: Path) -> list[str]:
    data = bytearray(source.read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return ["header length", "some other kind of file"]


def _empty_file(path: Path, source: Path) -> list[str]:
    path.write_bytes(b"")
    return ["empty (0 bytes)"]


@pytest.mark.parametrize("damage", [_truncated, _bad_header_json, _absurd_header_length, _empty_file],
                         ids=["truncated", "corrupt_header_json", "absurd_header_length", "empty"])
def test_damaged_safetensors(tmp_path, tiny_files, capsys, damage):
    path = tmp_path / "damaged.safetensors"
    needles = damage(path, tiny_files["sd1"]["safetensors"])
    raises_naming(CheckpointError, lambda: read_checkpoint(path), "damaged.safetensors", *needles)
    err = convert_fails(capsys, path, out=tmp_path / "out.safetensors")
    assert "damaged.safetensors" in err and needles[0] in err


def test_damaged_safetensors_inside_a_diffusers_folder(tmp_path, tiny_files, capsys):
    folder = linked_copy(tiny_files["sd1"]["diffusers_safetensors"], tmp_path / "pipeline")
    weights = folder / "text_encoder" / "model.safetensors"
    data = weights.read_bytes()
    replace_file(weights, data[: len(data) - 1000])
    raises_naming(CheckpointError, lambda: read_checkpoint(folder), "text_encoder/model.safetensors", "truncated",
                  "fetch it again")
    out = tmp_path / "out_diffusers"
    convert_fails(capsys, folder, out=out, existing=False)


# ----------------------------------------------------------------------------------------------------------
# 4. Random bytes named .ckpt (and a truncated real .ckpt)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about the "pickle protocol" of random bytes
@pytest.mark.parametrize("head", [b"", b"\x80", b"PK"], ids=["random", "random_after_pickle_proto", "random_after_PK"])
def test_random_bytes_named_ckpt(tmp_path, capsys, head):
    path = tmp_path / "random.ckpt"
    path.write_bytes(head + random.Random(len(head)).randbytes(4096))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    # Corrupt data is not a security refusal: the message must not send the user to --allow_unsafe_pickle first.
    assert not isinstance(info.value, UnsafePickleError), str(info.value)
    message = str(info.value)
    assert "random.ckpt" in message and "not a valid PyTorch checkpoint" in message and "fetch it again" in message
    err = convert_fails(capsys, path, out=tmp_path / "out.safetensors")
    assert "random.ckpt" in err and "not a valid PyTorch checkpoint" in err


def test_truncated_ckpt(tmp_path, tiny_files, capsys):
    data = tiny_files["sd1"]["ckpt"].read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: len(data) // 2])
    raises_naming(CheckpointError, lambda: read_checkpoint(path), "cut.ckpt", "truncated", "Fetch the file again")
    convert_fails(capsys, path, out=tmp_path / "out.ckpt")


# ----------------------------------------------------------------------------------------------------------
# 5. Malicious pickle


class _TouchesMarker:
    """Unpickling this (with plain pickle) creates `marker`: stands in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _evil_ckpt(path: Path, marker: Path, sd1_tensors, *, legacy: bool) -> Path:
    # A real (tiny) SD 1.x state dict, so that the trusted load in the positive control fully succeeds.
    payload = {"state_dict": dict(sd1_tensors[0]), "evil": _TouchesMarker(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, sd1_tensors, capsys, monkeypatch, legacy):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    path = _evil_ckpt(tmp_path / "evil.ckpt", marker, sd1_tensors, legacy=legacy)
    # The offending globals: Path.touch is pickled as getattr(pathlib.Path, "touch").
    needles = ["evil.ckpt", "refused to load", "builtins.getattr", "--allow_unsafe_pickle", "Nothing was executed"]
    if not legacy:
        needles.append("pathlib.Path")  # the zip format lets torch list every global without loading
    raises_naming(UnsafePickleError, lambda: read_checkpoint(path), *needles)
    assert not marker.exists()
    raises_naming(UnsafePickleError, lambda: open_tensor_file(path), "evil.ckpt", "--allow_unsafe_pickle")
    assert not marker.exists()

    err = convert_fails(capsys, path, out=tmp_path / "out.safetensors")
    assert "evil.ckpt" in err and "getattr" in err and "--allow_unsafe_pickle" in err
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_positive_control(tmp_path, sd1_tensors, monkeypatch, legacy):
    """With allow_unsafe_pickle the pickle does run: proof that the test above could see code execution."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    path = _evil_ckpt(tmp_path / "evil.ckpt", marker, sd1_tensors, legacy=legacy)
    with read_checkpoint(path, allow_unsafe_pickle=True) as checkpoint:
        assert checkpoint.family.name == "sd1"
    assert marker.exists()


def test_malicious_pickle_as_vae_is_refused(tmp_path, tiny_files, sd1_tensors, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    path = _evil_ckpt(tmp_path / "evil_vae.ckpt", marker, sd1_tensors, legacy=False)
    with read_checkpoint(tiny_files["sd1"]["safetensors"]) as checkpoint:
        raises_naming(UnsafePickleError, lambda: replace_vae(checkpoint, path), "evil_vae.ckpt",
                      "--allow_unsafe_pickle")
    assert not marker.exists()
    err = convert_fails(capsys, "--vae", path, tiny_files["sd1"]["safetensors"], out=tmp_path / "out.safetensors")
    assert "evil_vae.ckpt" in err and "--allow_unsafe_pickle" in err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# 6-8. Unknown, missing and wrong-shaped tensors


@pytest.mark.parametrize("count", [1, 8])
def test_unknown_extra_keys(tmp_path, sd1_tensors, capsys, count):
    extra = {"model.diffusion_model.bogus.weight": torch.zeros(3)}
    extra.update({f"model.diffusion_model.bogus{i}.weight": torch.zeros(2) for i in range(count - 1)})
    path = write_variant(tmp_path / "extra.safetensors", sd1_tensors, add=extra)
    message = raises_naming(CheckpointError, lambda: read_checkpoint(path), "extra.safetensors",
                            f"{count} unknown tensor(s)", "model.diffusion_model.bogus.weight",
                            "nothing was converted")
    if count > 6:
        assert f"(+{count - 6} more)" in message
    err = convert_fails(capsys, path, out=tmp_path / "out.safetensors")
    assert "model.diffusion_model.bogus.weight" in err


def test_missing_keys(tmp_path, sd1_tensors, capsys):
    path = write_variant(tmp_path / "missing.safetensors", sd1_tensors, drop={UNET_KEY, TE_KEY})
    raises_naming(CheckpointError, lambda: read_checkpoint(path), "missing.safetensors", "2 tensor(s) missing",
                  UNET_KEY, TE_KEY, "incomplete")
    err = convert_fails(capsys, path, out=tmp_path / "out_folder", existing=False)
    assert UNET_KEY in err and TE_KEY in err


def test_missing_key_in_a_diffusers_folder(tmp_path, tiny_files):
    folder = linked_copy(tiny_files["sd1"]["diffusers_safetensors"], tmp_path / "pipeline")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    with SafetensorsReader(weights) as reader:
        tensors = {k: reader.read(k) for k in reader.keys()}
    dropped = "decoder.conv_out.weight"
    del tensors[dropped]
    weights.unlink()
    save_tensors(weights, tensors)
    raises_naming(CheckpointError, lambda: read_checkpoint(folder), "vae/diffusion_pytorch_model.safetensors",
                  "1 tensor(s) missing", dropped)


def test_wrong_tensor_shape(tmp_path, sd1_tensors, capsys):
    path = write_variant(tmp_path / "shape.safetensors", sd1_tensors, add={UNET_KEY: torch.zeros(7, 3)})
    expected = tuple(sd1_tensors[0][UNET_KEY].shape)
    raises_naming(CheckpointError, lambda: read_checkpoint(path), "shape.safetensors", "wrong shape", UNET_KEY,
                  "(7, 3)", f"expected {expected}")
    err = convert_fails(capsys, path, out=tmp_path / "out.ckpt")
    assert UNET_KEY in err and "wrong shape" in err


def test_wrong_tensor_shape_in_a_diffusers_folder(tmp_path, tiny_files):
    folder = linked_copy(tiny_files["sd1"]["diffusers_safetensors"], tmp_path / "pipeline")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with SafetensorsReader(weights) as reader:
        tensors = {k: reader.read(k) for k in reader.keys()}
    key = "conv_out.bias"
    tensors[key] = torch.zeros(5)
    weights.unlink()
    save_tensors(weights, tensors)
    raises_naming(CheckpointError, lambda: read_checkpoint(folder), "unet/diffusion_pytorch_model.safetensors",
                  "wrong shape", key, "(5,)")


# ----------------------------------------------------------------------------------------------------------
# 9. Family flags that contradict the weights


@pytest.mark.parametrize("family, fmt, hints, needles", [
    ("sd1", "safetensors", FamilyHints(v2=True), ["--v2 was given", "SD 1.x", "Remove --v2"]),
    ("sd1", "diffusers", FamilyHints(v2=True), ["--v2 was given", "SD 1.x", "Remove --v2"]),
    ("sd2-512", "safetensors", FamilyHints(v2=False), ["--v1 was given", "SD 2.x", "Remove --v1"]),
    ("sd2-768-v", "ckpt", FamilyHints(v2=False), ["--v1 was given", "SD 2.x", "Remove --v1"]),
    ("sd2-512", "safetensors", FamilyHints(v_parameterization=True),
     ["--v_parameterization was given", "modelspec.prediction_type", "epsilon", "Remove the flag"]),
    ("sd1", "safetensors", FamilyHints(v_parameterization=True),
     ["--v_parameterization was given", "modelspec.prediction_type", "epsilon", "Remove the flag"]),
    ("sd2-512", "diffusers_safetensors", FamilyHints(v_parameterization=True),
     ["--v_parameterization was given", "scheduler/scheduler_config.json", "epsilon", "Remove the flag"]),
    ("sdxl", "safetensors", FamilyHints(v2=True), ["--v2 was given", "SDXL base", "Remove --v2"]),
    ("sdxl", "diffusers", FamilyHints(v2=False), ["--v1 was given", "SDXL base", "Remove --v1"]),
    ("sdxl-refiner", "safetensors", FamilyHints(v2=True), ["--v2 was given", "SDXL refiner", "Remove --v2"]),
])
def test_family_hint_contradicting_the_weights(tiny_files, family, fmt, hints, needles):
    path = tiny_files[family][fmt]
    raises_naming(CheckpointError, lambda: read_checkpoint(path, hints), path.name, *needles)


@pytest.mark.parametrize("flag, family, needle", [("--v2", "sd1", "Remove --v2"), ("--v1", "sd2-512", "Remove --v1"),
                                                  ("--v_parameterization", "sd2-512", "modelspec.prediction_type")])
def test_family_flag_contradicting_the_weights_cli(tmp_path, tiny_files, capsys, flag, family, needle):
    path = tiny_files[family]["safetensors"]
    err = convert_fails(capsys, flag, path, out=tmp_path / "out.safetensors")
    assert path.name in err and flag in err and needle in err


# ----------------------------------------------------------------------------------------------------------
# 10. Unwritable output path


@pytest.mark.parametrize("where", ["parent_is_a_file", "parent_is_a_file_nested", "proc_file", "proc_folder"])
def test_unwritable_output(tmp_path, tiny_files, capsys, where):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"I am a file")
    dest = {"parent_is_a_file": blocker / "out.safetensors", "parent_is_a_file_nested": blocker / "sub" / "out",
            "proc_file": Path("/proc/x.safetensors"), "proc_folder": Path("/proc/x_diffusers")}[where]
    raises_naming(OutputPathError, lambda: check_writable_output(dest), str(dest), "choose another output path")
    err = convert_fails(capsys, tiny_files["sd1"]["safetensors"], out=dest, existing=False)
    assert str(dest) in err and "choose another output path" in err
    assert blocker.read_bytes() == b"I am a file"


# ----------------------------------------------------------------------------------------------------------
# 11. Output path that is (or overlaps) an input


def _same_path_case(tmp_path: Path, tiny_files, spelling: str) -> tuple[Path, Path]:
    model = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_files["sd1"]["safetensors"], model)
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.safetensors"
    link.symlink_to(model)
    return {"same": (model, model), "dotdot": (model, tmp_path / "sub" / ".." / "model.safetensors"),
            "relative": (model, Path(os.path.relpath(model))),
            "symlink_as_output": (model, link), "symlink_as_input": (link, model)}[spelling]


@pytest.mark.parametrize("spelling", ["same", "dotdot", "relative", "symlink_as_output", "symlink_as_input"])
def test_output_equal_to_input(tmp_path, tiny_files, capsys, spelling):
    source, dest = _same_path_case(tmp_path, tiny_files, spelling)
    before = digest(tmp_path / "model.safetensors")
    raises_naming(OutputPathError, lambda: check_writable_output(dest, sources=[source]), "same as the input",
                  "choose a different output path")
    capsys.readouterr()
    assert convert_tool.main([str(source), str(dest)]) == 2
    err = capsys.readouterr().err
    assert "same as the input" in err and "model.safetensors" in err
    assert digest(tmp_path / "model.safetensors") == before
    assert leftovers(tmp_path / "model.safetensors") == []


def _overlap_case(tmp_path: Path, tiny_files, case: str) -> tuple[list[str], Path, str]:
    """(convert arguments, the input to protect, expected message part)."""
    if case == "diffusers_folder_onto_itself":
        folder = linked_copy(tiny_files["sd1"]["diffusers_safetensors"], tmp_path / "pipeline")
        return [folder, folder], folder, "same as the input"
    if case == "output_inside_input_folder":
        folder = linked_copy(tiny_files["sd1"]["diffusers_safetensors"], tmp_path / "pipeline")
        return [folder, folder / "unet" / "diffusion_pytorch_model.safetensors"], folder, "inside the input"
    if case == "output_folder_containing_input":
        (tmp_path / "models").mkdir()
        model = tmp_path / "models" / "model.safetensors"
        shutil.copyfile(tiny_files["sd1"]["safetensors"], model)
        # A diffusers output replaces the whole folder: the input would be deleted with it.
        return [model, tmp_path / "models"], tmp_path / "models", "contains the input"
    if case == "vae_as_output":
        vae = tmp_path / "vae.safetensors"
        shutil.copyfile(tiny_files["sd1"]["safetensors"], vae)
        return ["--vae", vae, tiny_files["sd1"]["safetensors"], vae], vae, "same as the input"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["diffusers_folder_onto_itself", "output_inside_input_folder",
                                  "output_folder_containing_input", "vae_as_output"])
def test_output_overlapping_an_input(tmp_path, tiny_files, capsys, case):
    args, protected, needle = _overlap_case(tmp_path, tiny_files, case)
    before = digest(protected)
    capsys.readouterr()
    assert convert_tool.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and needle in err and "choose" in err
    assert digest(protected) == before
    assert leftovers(Path(args[-1])) == []


# ----------------------------------------------------------------------------------------------------------
# 12. --vae that is not a VAE for this model


def _vae_wrong_shape(tmp_path, sd1_tensors, tiny_files):
    vae = {k[len("first_stage_model."):]: v for k, v in sd1_tensors[0].items() if k.startswith("first_stage_model.")}
    vae["decoder.conv_out.weight"] = torch.zeros(3, 5, 3, 3)  # a decoder of another width
    save_tensors(tmp_path / "other_vae.safetensors", vae)
    return tmp_path / "other_vae.safetensors", ["other_vae.safetensors", "not a VAE for this model", "wrong shape",
                                                "first_stage_model.decoder.conv_out.weight", "(3, 5, 3, 3)", "--vae"]


def _vae_unet_only(tmp_path, sd1_tensors, tiny_files):
    unet = {k: v for k, v in sd1_tensors[0].items() if k.startswith("model.diffusion_model.")}
    save_tensors(tmp_path / "unet_only.safetensors", unet)
    return tmp_path / "unet_only.safetensors", ["unet_only.safetensors", "not a VAE for this model", "missing",
                                                "first_stage_model.encoder.conv_in.weight", "unknown", "--vae"]


def _vae_missing(tmp_path, sd1_tensors, tiny_files):
    return tmp_path / "no_such_vae.safetensors", ["no_such_vae.safetensors", "no such VAE file", "--vae",
                                                  "Check the path"]


def _vae_folder_other_width(tmp_path, sd1_tensors, tiny_files):
    folder = linked_copy(tiny_files["sd1"]["diffusers_safetensors"] / "vae", tmp_path / "vae_folder")
    config = json.loads((folder / "config.json").read_text())
    config["block_out_channels"] = [c * 2 for c in config["block_out_channels"]]
    replace_file(folder / "config.json", json.dumps(config))
    return folder, ["vae_folder", "block_out_channels", "do not match", "--vae"]


@pytest.mark.parametrize("make", [_vae_wrong_shape, _vae_unet_only, _vae_missing, _vae_folder_other_width],
                         ids=["wrong_shape", "unet_only_file", "nonexistent", "folder_of_other_width"])
def test_vae_that_does_not_fit(tmp_path, tiny_files, sd1_tensors, capsys, make):
    vae, needles = make(tmp_path, sd1_tensors, tiny_files)
    with read_checkpoint(tiny_files["sd1"]["safetensors"]) as checkpoint:
        original_vae = checkpoint.tensors["vae"]
        raises_naming(CheckpointError, lambda: read_vae(vae, checkpoint), *needles)
        raises_naming(CheckpointError, lambda: replace_vae(checkpoint, vae), *needles[:2])
        assert checkpoint.tensors["vae"] is original_vae  # a failed replacement leaves the model's VAE in place
    err = convert_fails(capsys, "--vae", vae, tiny_files["sd1"]["safetensors"], out=tmp_path / "out.safetensors")
    assert needles[0] in err and needles[1] in err


# ----------------------------------------------------------------------------------------------------------
# 13. Corrupt JSON in a diffusers folder


@pytest.mark.parametrize("config", ["model_index.json", "unet/config.json", "vae/config.json",
                                    "text_encoder/config.json", "scheduler/scheduler_config.json"])
def test_corrupt_json_config(tmp_path, tiny_files, capsys, config):
    folder = linked_copy(tiny_files["sd1"]["diffusers_safetensors"], tmp_path / "pipeline")
    replace_file(folder / config, '{\n  "in_channels": 4,\n  "sample_size": \n}\n')
    raises_naming(CheckpointError, lambda: read_checkpoint(folder), str(folder / config), "invalid JSON",
                  "line 4 column 1", "fetch the model again")
    err = convert_fails(capsys, folder, out=tmp_path / "out.safetensors")
    assert config in err and "line 4 column 1" in err


def test_json_config_that_is_not_an_object(tmp_path, tiny_files, capsys):
    folder = linked_copy(tiny_files["sd1"]["diffusers_safetensors"], tmp_path / "pipeline")
    replace_file(folder / "unet" / "config.json", "[1, 2, 3]\n")
    raises_naming(CheckpointError, lambda: read_checkpoint(folder), "unet/config.json", "expected a JSON object",
                  "list")
    convert_fails(capsys, folder, out=tmp_path / "out.safetensors")


# ----------------------------------------------------------------------------------------------------------
# 14. Other model types passed as an SD model


def test_incomplete_sdxl_file(tmp_path, capsys, tiny_files):
    with SafetensorsReader(tiny_files["sdxl"]["safetensors"]) as reader:
        tensors = {k: reader.read(k) for k in reader.keys()
                   if not k.startswith("conditioner.embedders.1.model.transformer.resblocks.1.")}
    path = tmp_path / "sdxl_part.safetensors"
    save_tensors(path, tensors)
    raises_naming(CheckpointError, lambda: read_checkpoint(path), "sdxl_part.safetensors", "missing",
                  "conditioner.embedders.1.model.transformer.resblocks.1.", "Stable Diffusion XL base")
    err = convert_fails(capsys, path, out=tmp_path / "out_folder", existing=False)
    assert "missing" in err


def test_sdxl_pipeline_folder_without_its_second_text_encoder(tmp_path, tiny_files):
    folder = linked_copy(tiny_files["sd1"]["diffusers_safetensors"], tmp_path / "pipeline")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    replace_file(folder / "model_index.json", json.dumps(index))
    raises_naming(CheckpointError, lambda: read_checkpoint(folder), "model_index.json", "StableDiffusionXLPipeline",
                  "without text_encoder_2")


def test_unknown_pipeline_folder(tmp_path, tiny_files):
    folder = linked_copy(tiny_files["sd1"]["diffusers_safetensors"], tmp_path / "pipeline")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    replace_file(folder / "model_index.json", json.dumps(index))
    raises_naming(CheckpointError, lambda: read_checkpoint(folder), "model_index.json", "FluxPipeline",
                  "StableDiffusionXLPipeline")


@pytest.mark.parametrize("family", ["sdxl-refiner"])
def test_sdxl_model_in_a_tool_for_sd_models(tmp_path, capsys, tiny_files, family):
    """Tools not made for a model (ControlNets for the SDXL refiner: there are none) refuse it by name before any
    work, rather than failing on a key."""
    from tools import convert_controlnet

    model = tiny_files[family]["safetensors"]
    out = tmp_path / "controlnet"
    assert convert_controlnet.main([str(tmp_path / "cn.safetensors"), str(out), "--base_model", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and model.name in err and "SDXL" in err and "convert_controlnet.py" in err
    assert "not support it yet" in err
    assert not out.exists()


def tiny_lora(path: Path, family: str) -> Path:
    """A LoCon file written by our network on the family's tiny model, as its trainer would save it."""
    from library.families import FAMILIES
    from library.tiny_models import build_tiny_models
    from networks.lora import create_network

    models = build_tiny_models(FAMILIES[family])
    network = create_network(1.0, 4, 1, None, models.text_encoders, models.unet, conv_dim="4")
    network.save_weights(path, None, {"ss_base_model_version": FAMILIES[family].ss_base_model_version})
    return path


SDXL_NAMES = ["a LoRA for SDXL", "text encoders lora_te1_ / lora_te2_",
              "U-Net names in Stability's input_blocks / middle_block / output_blocks layout"]
SD_NAMES = ["a LoRA for SD 1.x / 2.x", "text encoder lora_te_",
            "U-Net names in diffusers' down_blocks / mid_block / up_blocks layout"]


@pytest.mark.parametrize("lora_family,model_family,lora_is,model_is", [
    ("sdxl", "sd1", SDXL_NAMES, "this model is SD 1.x / 2.x"),
    ("sd1", "sdxl", SD_NAMES, "this model is SDXL (text encoders lora_te1_ / lora_te2_"),
    ("sd2-512", "sdxl-refiner", SD_NAMES, "this model is SDXL (text encoder lora_te_"),
])
def test_lora_for_another_family_says_which_family_it_is(tmp_path, capsys, tiny_files, lora_family, model_family,
                                                        lora_is, model_is):
    """Merged into a checkpoint file (merge_lora.py) or into / onto live models (networks.lora: --base_weights,
    --network_weights, gen_img), a LoRA of another family fails naming the file and what its module names are,
    and nothing is written or changed."""
    from library.families import FAMILIES
    from library.tiny_models import build_tiny_models
    from networks import merge_lora
    from networks.lora import create_network_from_weights, merge_weight_files

    lora = tiny_lora(tmp_path / f"{lora_family}_lora.safetensors", lora_family)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(PREVIOUS_OUTPUT)
    capsys.readouterr()
    assert merge_lora.main(["--sd_model", str(tiny_files[model_family]["safetensors"]), "--models", str(lora),
                            "--save_to", str(out)]) == 2
    err = capsys.readouterr().err
    for needle in (str(lora), "does not fit this model", *lora_is, model_is, "Nothing was written"):
        assert needle in err, f"{needle!r} not in: {err}"
    assert_nothing_written(out, PREVIOUS_OUTPUT)

    models = build_tiny_models(FAMILIES[model_family])
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    raises_naming(ValueError, lambda: merge_weight_files([str(lora)], None, models.text_encoders, models.unet),
                  str(lora), "match no layer of these models", *lora_is, model_is)
    raises_naming(ValueError, lambda: create_network_from_weights(1.0, str(lora), None, models.text_encoders,
                                                                  models.unet), *lora_is, model_is)
    assert all(torch.equal(v, before[k]) for k, v in models.unet.state_dict().items())


def test_sdxl_lora_with_diffusers_unet_names_is_told_apart(tmp_path, tiny_files, capsys):
    """diffusers' SDXL trainers export kohya-style files whose U-Net names keep diffusers' layout; kohya's SDXL
    files (and ours) use Stability's. The message says so instead of a bare "match no layer"."""
    from library.safetensors_io import SafetensorsReader
    from networks import merge_lora

    with SafetensorsReader(tiny_lora(tmp_path / "sdxl.safetensors", "sdxl")) as reader:
        tensors = {k: reader.read(k) for k in reader.keys() if k.startswith("lora_te")}
        stem = "lora_unet_input_blocks_4_1_proj_in"
        tensors.update({k.replace(stem, "lora_unet_down_blocks_1_attentions_0_proj_in"): reader.read(k)
                        for k in reader.keys() if k.startswith(stem + ".")})
    save_tensors(tmp_path / "diffusers_named.safetensors", tensors)
    out = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--sd_model", str(tiny_files["sdxl"]["safetensors"]), "--models",
                            str(tmp_path / "diffusers_named.safetensors"), "--save_to", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 module(s) name no layer" in err and "lora_unet_down_blocks_1_attentions_0_proj_in" in err
    assert ("Its U-Net names are in diffusers' down_blocks / mid_block / up_blocks layout; this model's LoRA names "
            "are in Stability's input_blocks / middle_block / output_blocks layout (kohya's layout for SDXL)") in err
    assert not out.exists()


LORAS = {
    "kohya": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)},
              {"ss_network_module": "networks.lora"}),
    "kohya_text_encoder_only": ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
                                None),
    "peft": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
              "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)}, None),
    "diffusers": ({"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.zeros(4, 32),
                   "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": torch.zeros(32, 4)}, None),
}


@pytest.mark.parametrize("layout", list(LORAS))
def test_lora_passed_as_a_model(tmp_path, capsys, layout):
    tensors, metadata = LORAS[layout]
    path = tmp_path / "my_lora.safetensors"
    save_tensors(path, tensors, metadata)
    raises_naming(CheckpointError, lambda: read_checkpoint(path), "my_lora.safetensors", "LoRA file",
                  "Pass the base model")
    err = convert_fails(capsys, path, out=tmp_path / "out.safetensors")
    assert "LoRA" in err


def test_diffusers_output_never_replaces_an_unrelated_folder(tiny_files, tmp_path):
    from library.atomic_files import OutputPathError
    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.sd_checkpoint import read_checkpoint

    folder = tmp_path / "my_documents"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    with read_checkpoint(tiny_files["sd1"]["safetensors"]) as checkpoint:
        with pytest.raises(OutputPathError, match="not a diffusers model"):
            save_checkpoint(checkpoint, folder, SaveFormat.DIFFUSERS_SAFETENSORS)
        assert (folder / "thesis.txt").read_text() == "precious"
        # An existing model folder is replaced (the intended overwrite).
        save_checkpoint(checkpoint, tmp_path / "model", SaveFormat.DIFFUSERS_SAFETENSORS)
        save_checkpoint(checkpoint, tmp_path / "model", SaveFormat.DIFFUSERS_SAFETENSORS)
        assert (tmp_path / "model" / "model_index.json").is_file()
