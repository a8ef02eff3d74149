"""Tiny stand-ins for every file the README's GPU-sized examples name: what a user swaps for their own model, images
and LoRAs. Run by tests/test_readme.py (through the warm `python`, so it pays no import time):

    python tests/readme_stand_ins.py FOLDER

The example prompt file (prompts.txt) is written by the test itself, from the README.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from library import key_maps  # noqa: E402
from library.checkpoint_writer import SaveFormat, save_checkpoint  # noqa: E402
from library.families import FAMILIES  # noqa: E402
from library.tiny_models import build_tiny_models, tiny_checkpoint  # noqa: E402
from networks.lora import create_network  # noqa: E402
from tools.make_synthetic_dataset import draw  # noqa: E402

SD1 = FAMILIES["sd1"]


def models(root: Path) -> None:
    base = save_checkpoint(tiny_checkpoint(SD1, seed=0), root / "v1-5-pruned-emaonly.safetensors",
                           SaveFormat.SAFETENSORS)
    shutil.copy(base, root / "model.safetensors")
    other = tiny_checkpoint(SD1, seed=1)
    save_checkpoint(other, root / "model_a.safetensors", SaveFormat.SAFETENSORS)
    save_checkpoint(other, root / "model_b.ckpt", SaveFormat.CKPT)
    save_checkpoint(other, root / "model_c_diffusers", SaveFormat.DIFFUSERS_SAFETENSORS)
    save_checkpoint(tiny_checkpoint(FAMILIES["sd2-768-v"], seed=2), root / "sd2_768v_folder", SaveFormat.DIFFUSERS)
    save_checkpoint(tiny_checkpoint(FAMILIES["sdxl"], seed=3), root / "sd_xl_base_1.0.safetensors",
                    SaveFormat.SAFETENSORS)
    save_checkpoint(tiny_checkpoint(FAMILIES["sdxl-refiner"], seed=4), root / "sd_xl_refiner_1.0.safetensors",
                    SaveFormat.SAFETENSORS)
    # An old pickle with EMA weights (model_ema.* beside the U-Net), as sd-v1-4-full-ema.ckpt is.
    tensors = load_file(base)
    for key in [k for k in tensors if k.startswith(key_maps.UNET_PREFIX)]:
        tensors[key_maps.ema_key(key)] = tensors[key] * 0.5
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    torch.save({"state_dict": tensors, "global_step": 1000}, root / "sd-v1-4-full-ema.ckpt")


def images(root: Path) -> None:
    rng = random.Random(0)

    def picture(path: Path, caption: str | None = None, tags: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        image, _ = draw(rng, 64, 64)
        image.save(path)
        if caption is not None:
            path.with_suffix(".caption").write_text(caption + "\n", encoding="utf-8")
        if tags is not None:
            path.with_suffix(".txt").write_text(tags + "\n", encoding="utf-8")

    picture(root / "data" / "10_sks dog" / "img001.png", "sks dog, sitting on grass")
    picture(root / "reg" / "1_dog" / "img001.png")  # a hand-made reg image; train_db generates one more
    picture(root / "images" / "img001.png", "a watercolour of a harbour", "watercolor, harbor, boat")
    picture(root / "images" / "img002.png", "a watercolour of a hill", "watercolor, hill, rating:safe")
    picture(root / "mychar_data" / "10_mychar girl" / "img001.png", "mychar, a girl in a red coat")
    picture(root / "photo.png")
    picture(root / "photos" / "20_cttoy toy" / "front.png", "A photo of the front of a cttoy, white background")


def loras(root: Path) -> None:
    tiny = build_tiny_models(SD1, seed=0)
    for seed, (name, dim, conv) in enumerate([("style", 4, False), ("char", 4, False), ("a", 4, True),
                                              ("b", 4, True), ("big", 8, True)], start=1):
        torch.manual_seed(seed)
        kwargs = {"conv_dim": str(dim), "conv_alpha": "1"} if conv else {}
        network = create_network(1.0, dim, dim / 2, None, tiny.text_encoder, tiny.unet, **kwargs)
        with torch.no_grad():
            for module in network.loras:
                module.lora_up.weight.normal_(0, 0.1)  # a trained LoRA's up weights are not zero
        network.save_weights(root / f"{name}.safetensors", None, {
            "ss_network_module": "networks.lora", "ss_base_model_version": SD1.ss_base_model_version})
    # A DyLoRA of rank 8 in units of 4, and a kohya OFT (networks.dylora / networks.oft, trained-looking weights).
    from networks import dylora, oft

    torch.manual_seed(6)
    network = dylora.create_network(1.0, 8, 4, None, tiny.text_encoder, tiny.unet, unit="4")
    with torch.no_grad():
        for module in network.loras:
            for up in module.up_parameters():
                up.normal_(0, 0.1)
    network.save_weights(root / "dylora.safetensors", None, {"ss_network_module": "networks.dylora",
                                                             "ss_network_args": '{"unit": "4"}'})
    network = oft.create_network(1.0, 4, 1e-3, None, tiny.text_encoder, tiny.unet)
    with torch.no_grad():
        for module in network.loras:
            module.oft_blocks.normal_(0, 0.01)
    network.save_weights(root / "oft.safetensors", None, {"ss_network_module": "networks.oft"})


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    models(root)
    images(root)
    loras(root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
