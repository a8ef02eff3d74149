"""Count kohya's command-line flags, script by script, from a checkout of kohya-ss/sd-scripts: the data behind
tests/data/kohya_flags.json, which tests/test_kohya_flags.py holds our parsers against.

    python benchmarks/kohya_flags.py /path/to/sd-scripts > tests/data/kohya_flags.json
    python benchmarks/kohya_flags.py /path/to/exported/files --commit 48d368fa... > ...   # a copy without .git

Each script's own `setup_parser()` is called (kohya builds its parsers from shared argument groups, so reading
the source for `add_argument` calls would miss or misattribute flags). Modules kohya imports that are not installed
here (torchvision, OpenCV, timm) are stood in for by empty modules, so only the parsers are built: no model or
dataset code runs. transformers 5 renamed `CLIPFeatureExtractor`; the checkout is read through a copy that uses the
new name. Records the checkout's commit.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

SCRIPTS = ["train_network", "sdxl_train_network", "train_db", "fine_tune", "sdxl_train", "train_textual_inversion",
           "sdxl_train_textual_inversion", "train_control_net", "sdxl_train_control_net", "gen_img",
           "networks.merge_lora", "networks.sdxl_merge_lora", "networks.svd_merge_lora", "networks.resize_lora",
           "networks.extract_lora_from_models", "networks.check_lora_weights", "networks.extract_lora_from_dylora",
           "tools.convert_diffusers20_original_sd", "tools.cache_latents", "tools.cache_text_encoder_outputs",
           "tools.resize_images_to_resolution", "finetune.merge_captions_to_metadata",
           "finetune.merge_dd_tags_to_metadata", "finetune.prepare_buckets_latents", "finetune.clean_captions_and_tags",
           "finetune.tag_images_by_wd14_tagger", "finetune.make_captions",
           "finetune.make_captions_by_git"]
NOT_INSTALLED = {"torchvision", "cv2", "timm", "fairscale"}


class _Empty(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Empty(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return _Empty("call")

    def __mro_entries__(self, bases):
        return (object,)


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in NOT_INSTALLED:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        return _Empty(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def flags_of(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    parser = module.setup_parser()
    return sorted({o for action in parser._actions for o in action.option_strings if o.startswith("--")} - {"--help"})


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkout", type=Path, help="a folder with kohya-ss/sd-scripts' files")
    p.add_argument("--commit", default=None, help="the commit the files are from (default: the checkout's HEAD)")
    args = p.parse_args()
    checkout = args.checkout.resolve()
    commit = args.commit or subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
    copy = Path(tempfile.mkdtemp(prefix="kohya_flags_"))
    for source in checkout.rglob("*.py"):
        target = copy / source.relative_to(checkout)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text(encoding="utf-8").replace("CLIPFeatureExtractor", "CLIPImageProcessor"),
                          encoding="utf-8")
    importlib.import_module("diffusers.loaders.single_file_model")  # before the stand-ins: diffusers probes torchvision
    sys.meta_path.append(_StandIns())
    # kohya's scripts import their neighbours by bare name (`import lora` in networks/, ...).
    sys.path[:0] = [str(copy), str(copy / "networks"), str(copy / "tools"), str(copy / "finetune")]
    flags, failed = {}, {}
    for name in SCRIPTS:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # kohya's modules print while they are imported
                flags[name] = flags_of(name)
        except BaseException as e:  # a script that parses at import, or lacks setup_parser
            failed[name] = f"{type(e).__name__}: {e}"
    shutil.rmtree(copy)
    print(json.dumps({"kohya_commit": commit, "flags": flags, "not_counted": failed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
