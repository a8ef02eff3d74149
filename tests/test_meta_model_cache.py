"""The on-disk cache of meta-model facts (library/meta_model_cache.py): what it returns equals what building the
model gives, its entries are named by every input (library versions and our code included), a damaged entry is
rebuilt, and with a warm cache a conversion does not import diffusers (the point of the cache: ~8 s per run); the
facts of the released families ship with the code, so a first conversion of those needs no cache either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library import key_maps, meta_facts_bundle, meta_model_cache
from library.checkpoint_writer import _complete_config
from library.families import FAMILIES, ModelSize
from library.safetensors_io import SafetensorsReader

ROOT = Path(__file__).resolve().parent.parent


def components(family):
    configs = family.configs(ModelSize.TINY)
    yield "unet", configs.unet, None
    yield "vae", configs.vae, None
    for slot in family.text_encoders:
        yield slot.component, configs.text_encoders[slot.component], slot.kind


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_cached_facts_equal_the_built_models(family_name, tmp_path, monkeypatch):
    """Cold cache (built and stored), warm cache (read back) and no cache give the same shapes, in the same order
    (the order of an original file's tensors follows it), and the same completed configs."""
    for component, config, kind in components(FAMILIES[family_name]):
        built = key_maps._meta_model_shapes(component, config, kind)
        monkeypatch.setenv("SDTRAIN_META_CACHE", str(tmp_path))
        cold = key_maps._diffusers_shapes(component, config, kind)
        warm = key_maps._diffusers_shapes(component, config, kind)
        monkeypatch.setenv("SDTRAIN_META_CACHE", "")
        off = key_maps._diffusers_shapes(component, config, kind)
        assert list(built.items()) == list(cold.items()) == list(warm.items()) == list(off.items()), component
        if component in ("unet", "vae"):
            monkeypatch.setenv("SDTRAIN_META_CACHE", "")
            uncached = _complete_config(component, config)
            monkeypatch.setenv("SDTRAIN_META_CACHE", str(tmp_path))
            assert _complete_config(component, config) == uncached == _complete_config(component, config)


def test_entries_are_named_by_every_input(tmp_path, monkeypatch):
    inputs = {"fact": "x", "config": {"a": 1}}

    def compute():
        return 1

    name = meta_model_cache.entry_name(inputs, compute)
    assert meta_model_cache.entry_name({"fact": "x", "config": {"a": 2}}, compute) != name
    real_version = meta_model_cache.version
    for package in ("diffusers", "transformers"):
        monkeypatch.setattr(meta_model_cache, "version", lambda p: "0.0" if p == package else real_version(p))
        assert meta_model_cache.entry_name(inputs, compute) != name, package
    monkeypatch.setattr(meta_model_cache, "version", real_version)
    # Another source file for the computing function (our code edited) is another entry.
    other = tmp_path / "edited.py"
    other.write_text("def compute():\n    return 1\n")
    namespace = {}
    exec(compile(other.read_text(), str(other), "exec"), namespace)
    assert meta_model_cache.entry_name(inputs, namespace["compute"]) != name


def test_a_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTRAIN_META_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"answer": 42}

    assert meta_model_cache.cached({"fact": "t"}, compute) == {"answer": 42}
    (entry,) = tmp_path.iterdir()
    entry.write_text('{"value": ')  # cut short, as by a full disk
    assert meta_model_cache.cached({"fact": "t"}, compute) == {"answer": 42}
    assert len(calls) == 2 and json.loads(entry.read_text())["value"] == {"answer": 42}
    assert meta_model_cache.cached({"fact": "t"}, compute) == {"answer": 42} and len(calls) == 2


def test_an_unwritable_cache_folder_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SDTRAIN_META_CACHE", str(blocker / "cache"))
    assert meta_model_cache.cached({"fact": "u"}, lambda: [1, 2]) == [1, 2]


def test_warm_conversion_does_not_import_diffusers(tmp_path, tiny_files):
    """The second conversion of a model reads its facts from the cache: diffusers is never imported, and the file
    is the same as the first conversion's."""
    source = tiny_files["sd1"]["diffusers_safetensors"]
    env_cache = tmp_path / "cache"
    script = ("import atexit, runpy, sys\n"
              "atexit.register(lambda: print('DIFFUSERS', any(m.startswith('diffusers') for m in sys.modules)))\n"
              "sys.argv = ['convert'] + sys.argv[1:]\n"
              "runpy.run_path('tools/convert_diffusers20_original_sd.py', run_name='__main__')\n")
    outputs = []
    for run in ("cold", "warm"):
        out = tmp_path / f"{run}.safetensors"
        result = subprocess.run([sys.executable, "-c", script, str(source), str(out)], cwd=ROOT, capture_output=True,
                                text=True, env={**os.environ, "SDTRAIN_META_CACHE": str(env_cache)})
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append((result.stdout, out))
    assert "DIFFUSERS True" in outputs[0][0]  # the cold run built the meta models
    assert "DIFFUSERS False" in outputs[1][0]
    with SafetensorsReader(outputs[0][1]) as cold, SafetensorsReader(outputs[1][1]) as warm:
        assert list(cold.keys()) == list(warm.keys())  # same tensors in the same order...
        for key in cold.keys():  # ...with the same bytes (the metadata differ by their timestamp)
            a, b = cold.read(key), warm.read(key)
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), key


def test_the_shipped_bundle_is_what_the_code_computes_now():
    """The bundled facts are named without our code's digest, so nothing but this test notices when they go out of
    date (new diffusers or transformers, an edited model config or key map): it rebuilds them from the models."""
    shipped = meta_facts_bundle.read_bundle()
    rebuilt = meta_facts_bundle.build_entries()
    assert shipped == rebuilt, ("library/model_configs/meta_facts.json.gz is out of date: run "
                                "`python -m library.meta_facts_bundle` and commit the file")


def test_a_first_conversion_of_a_released_model_does_not_import_diffusers(tmp_path):
    """With an empty cache, reading a full-size SD 1.5 single file, writing its diffusers configs and reading that
    folder back take every fact from the bundle (the file is sparse: its header lists every tensor, its data is a
    hole, and nothing reads it)."""
    from library.families import SD1

    single = tmp_path / "sd1.safetensors"
    meta_facts_bundle.write_sparse_original_file(SD1, single)
    script = ("import sys\n"
              "from pathlib import Path\n"
              "from library.checkpoint_writer import write_config_folder\n"
              "from library.sd_checkpoint import diffusers_folder_configs, read_checkpoint\n"
              "with read_checkpoint(sys.argv[1]) as checkpoint:\n"
              "    tables = checkpoint.tables()\n"
              "    write_config_folder(checkpoint, Path(sys.argv[2]))\n"
              "back = diffusers_folder_configs(Path(sys.argv[2])).tables()\n"
              "assert [t.mappings for t in back.values()] == [t.mappings for t in tables.values()]\n"
              "print('FAMILY', checkpoint.family.name, 'TENSORS', sum(len(t.mappings) for t in tables.values()))\n"
              "print('DIFFUSERS', any(m.startswith('diffusers') for m in sys.modules))\n")
    env = {**os.environ, "SDTRAIN_META_CACHE": str(tmp_path / "empty_cache"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script, str(single), str(tmp_path / "folder")], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FAMILY sd1 TENSORS" in result.stdout and "DIFFUSERS False" in result.stdout, result.stdout
    assert not (tmp_path / "empty_cache").exists()  # nothing had to be computed
    # Without the bundle the same run builds the models (what the bundle saves a user's first conversion).
    result = subprocess.run([sys.executable, "-c", script, str(single), str(tmp_path / "folder2")], cwd=ROOT,
                            capture_output=True, text=True, env={**env, "SDTRAIN_META_BUNDLE": "0"})
    assert result.returncode == 0 and "DIFFUSERS True" in result.stdout, result.stderr[-2000:]
