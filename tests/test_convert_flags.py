"""tools/convert_diffusers20_original_sd.py's kohya flags --metadata and --variant."""

from __future__ import annotations

import torch

from library.safetensors_io import SafetensorsReader
from tools.convert_diffusers20_original_sd import main as convert


def test_metadata_goes_into_the_output_file_and_nothing_is_evaluated(tiny_files, tmp_path, capsys):
    out = tmp_path / "titled.safetensors"
    assert convert([str(tiny_files["sd1"]["safetensors"]), str(out), "--metadata",
                    "{'modelspec.title': 'my model', 'resolution': 512}"]) == 0
    with SafetensorsReader(out) as reader:
        assert reader.metadata["modelspec.title"] == "my model" and reader.metadata["resolution"] == "512"
    assert convert([str(tiny_files["sd1"]["safetensors"]), str(tmp_path / "x.safetensors"), "--metadata",
                    "__import__('os').system('echo pwned')"]) == 2
    assert "not a dict literal" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert convert([str(tiny_files["sd1"]["safetensors"]), str(tmp_path / "x.ckpt"), "--metadata", "{'a': 'b'}"]) == 2
    assert "only a single .safetensors file holds metadata" in capsys.readouterr().err


def test_variant_reads_a_folders_variant_weight_files(tiny_files, tmp_path, capsys):
    folder = tmp_path / "fp16_variant"
    assert convert([str(tiny_files["sd1"]["safetensors"]), str(folder), "--use_safetensors", "--fp16"]) == 0
    for weights in folder.glob("*/*.safetensors"):  # diffusers' variant layout: <name>.fp16.safetensors
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    assert convert([str(folder), str(tmp_path / "plain.safetensors")]) == 2
    assert "no weight file" in capsys.readouterr().err
    assert convert([str(folder), str(tmp_path / "back.safetensors"), "--variant", "fp16"]) == 0
    with SafetensorsReader(tmp_path / "back.safetensors") as back, SafetensorsReader(
            tiny_files["sd1"]["safetensors"]) as source:
        assert sorted(back.keys()) == sorted(source.keys())
        assert all(torch.equal(back.read(k), source.read(k).to(back.read(k).dtype)) for k in source.keys())
    assert convert([str(tiny_files["sd1"]["safetensors"]), str(tmp_path / "y.safetensors"), "--variant", "fp16"]) == 2
    assert "drop --variant" in capsys.readouterr().err


def test_extract_refuses_kohyas_model_placement_flags_with_the_reason(tiny_files, tmp_path, capsys):
    from networks.extract_lora_from_models import main as extract

    model = str(tiny_files["sd1"]["safetensors"])
    assert extract(["--model_org", model, "--model_tuned", model, "--save_to", str(tmp_path / "l.safetensors"),
                    "--load_tuned_model_to", "cuda"]) == 2
    assert "--load_tuned_model_to: this tool reads both models tensor by tensor" in capsys.readouterr().err
    assert not (tmp_path / "l.safetensors").exists()
