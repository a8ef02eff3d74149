"""Prior-preservation class images, generated with the base model when the regularisation folder has too few
(`--class_prompt`, `--num_class_images`, as the diffusers DreamBooth example; kohya needs them made by hand).

The images go into the DreamBooth class folder `<reg_data_dir>/1_<class prompt>` (or an existing
`<repeats>_<class prompt>` folder), so the folder name is their caption, exactly as for hand-made reg images.
Generation is resumable: images already there count and are kept; image `class_NNNNN.png` always comes from the
same seed, so an interrupted run completes to the same set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from library.families import DEPTH, EXTRA_CHANNELS
from library.images import is_image_file

logger = logging.getLogger(__name__)

_FOLDER_NAME = re.compile(r"^(\d+)_(.*)$")
_FORBIDDEN = set('/\\:*?"<>|')  # characters a folder name cannot hold on some system


@dataclass(frozen=True)
class ClassImagePlan:
    folder: Path
    existing: int
    to_generate: list[int]  # indices NNNNN of the class_NNNNN.png files to write


def plan_class_images(reg_data_dir: Path, class_prompt: str, count: int) -> ClassImagePlan:
    """Which folder and how many images, without touching the disk. Raises ValueError naming the flag."""
    prompt = class_prompt.strip()
    if not prompt:
        raise ValueError("--class_prompt is empty; give the class, e.g. --class_prompt \"a photo of a dog\"")
    bad = sorted(set(prompt) & _FORBIDDEN)
    if bad:
        raise ValueError(f"--class_prompt {class_prompt!r}: it names the class folder, so it cannot contain "
                         f"{' '.join(bad)}")
    folder = reg_data_dir / f"1_{prompt}"
    if reg_data_dir.is_dir():
        for candidate in sorted(reg_data_dir.iterdir()):
            match = _FOLDER_NAME.match(candidate.name)
            if candidate.is_dir() and match and match.group(2).strip() == prompt:
                folder = candidate
                break
    return plan_in_folder(folder, count)


def plan_in_folder(folder: Path, count: int) -> ClassImagePlan:
    """`count` class images in `folder` itself (diffusers' --class_data_dir): how many are missing."""
    if count < 1:
        raise ValueError(f"--num_class_images {count}: must be at least 1")
    present = sorted(p.name for p in folder.iterdir() if p.is_file() and is_image_file(p)) if folder.is_dir() else []
    taken = set(present)
    missing = max(0, count - len(present))
    indices, i = [], 0
    while len(indices) < missing:
        if f"class_{i:05d}.png" not in taken:
            indices.append(i)
        i += 1
    return ClassImagePlan(folder=folder, existing=len(present), to_generate=indices)


def check_writable(plan: ClassImagePlan) -> None:
    """Fail before loading models if images must be written where they cannot be."""
    if not plan.to_generate:
        return
    existing = plan.folder if plan.folder.exists() else next(p for p in plan.folder.parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--reg_data_dir: {len(plan.to_generate)} class image(s) must be generated into "
                         f"{plan.folder}, but {existing} is not writable; make it writable, choose another "
                         "--reg_data_dir, or lower --num_class_images")


def image_seed(seed: int, index: int) -> int:
    """The seed of class image `index`: a function of the run seed and the index only."""
    return int(hashlib.sha256(f"class-image:{seed}:{index}".encode()).hexdigest()[:15], 16)


def generate_class_images(plan: ClassImagePlan, *, prompt, models, sampler_name: str, seed: int, batch_size: int,
                          clip_skip: int | None = None) -> list[Path]:
    """Write the planned images (PNG with WebUI generation parameters), `batch_size` at a time, with a progress
    bar. Each file is written atomically, so an interrupted run leaves only complete images."""
    from tqdm import tqdm

    from library.samplers import make_scheduler, sampler_name as canonical
    from library.sampling import generate_batch, save_png, webui_parameters
    from library.text_conditioning import CaptionEncoding

    if not plan.to_generate:
        return []
    needs = {DEPTH: "depth map", EXTRA_CHANNELS: "condition image"}.get(models.family.unet_inputs)
    if needs:  # (an inpainting model generates them from the prompt alone, the whole image masked)
        raise ValueError(f"--class_prompt: each class image of {models.family.description.split(' (')[0]} needs its "
                         f"{needs}, which cannot be made up here; put the class images (and their {needs}s) in "
                         f"{plan.folder}")
    name = canonical(sampler_name)
    scheduler = make_scheduler(name, models.prediction_type.value)
    plan.folder.mkdir(parents=True, exist_ok=True)
    logger.info("generating %d class image(s) for %r into %s (%d already there)", len(plan.to_generate),
                prompt.prompt, plan.folder, plan.existing)
    written = []
    with tqdm(total=len(plan.to_generate), desc="class images", unit="image") as bar:
        for start in range(0, len(plan.to_generate), batch_size):
            indices = plan.to_generate[start:start + batch_size]
            seeds = [image_seed(seed, i) for i in indices]
            images = generate_batch(prompt, models=models, scheduler=scheduler, seeds=seeds,
                                    encoding=CaptionEncoding(clip_skip=clip_skip))
            for index, seed_used, image in zip(indices, seeds, images):
                path = plan.folder / f"class_{index:05d}.png"
                written.append(save_png(image, path, webui_parameters(prompt, sampler=name, seed=seed_used)))
            bar.update(len(indices))
    return written
