"""What kohya's captioners (finetune/make_captions.py with BLIP, make_captions_by_git.py with GIT) share: the local
model folder and its checks, the images of train_data_dir, reading them (in worker processes with
--max_data_loader_n_workers), batching them into the model and writing one caption file per image, atomically.
The model-specific part is a function from a batch of PIL images to their captions (library/blip_captioning.py,
library/git_captioning.py).

Nothing is downloaded: the model is a transformers folder copied here; a hub id or URL is refused with the command
that downloads it elsewhere. An image that cannot be read is reported by name at the end (exit status 1) and the
others are still captioned.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable

from library.atomic_files import atomic_file
from library.captions import caption_path_for
from library.images import IMAGE_EXTENSIONS, list_images
from library.ordered_prefetch import ordered_map

logger = logging.getLogger(__name__)


class CaptioningError(ValueError):
    """A captioning input that cannot be used (model location, folder, flag); the message says why and what to do."""


def download_hint(repo_id: str, flag: str) -> str:
    """How to get a hub model here: download it where there is internet access and give the copied folder."""
    local = repo_id.rsplit("/", 1)[-1]
    return (f"download {repo_id} on a machine with internet access (`huggingface-cli download {repo_id} "
            f"--local-dir {local}`), copy the folder here and give {flag} {local}")


def local_model_folder(given: str, flag: str, model_type: str, how: str) -> Path:
    """`given` as a local transformers folder of a `model_type` model (config.json's model_type). A folder of
    another model is refused here, since from_pretrained would build ours from it with random weights and a
    warning; anything else (hub id, URL, missing path) is refused with `how`."""
    path = Path(given)
    if not path.is_dir():
        # transformers would read a hub id from the Hugging Face cache or fail with an "offline mode" error; the
        # model is a folder here, so say that, once, before loading anything.
        raise CaptioningError(f"{flag} {given}: no such folder. Models are read from local folders only and "
                              "nothing is downloaded (as with HF_HUB_OFFLINE=1), so a Hugging Face hub id or URL "
                              f"does not work here; {how}")
    config = path / "config.json"
    if not config.is_file():
        raise CaptioningError(f"{flag} {path}: no config.json, so not a transformers model folder; {how}")
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as e:
        raise CaptioningError(f"{flag} {config}: not a readable model config ({e}); {how}") from None
    if found != model_type:
        raise CaptioningError(f"{flag} {path}: a {found!r} model (config.json's model_type), this tool needs "
                              f"a {model_type!r} one; {how}")
    return path


def load_pretrained(folder: Path, model_class, processor_class, device, what: str):
    """(model in eval mode on `device`, processor) from the folder's files only; `what` names the expected model."""
    try:
        processor = processor_class.from_pretrained(folder, local_files_only=True)
        model = model_class.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CaptioningError(f"{folder}: cannot be loaded as {what} with its processor files: {e}") from None
    return model.to(device).eval(), processor


def batching_problems(batch_size: int, workers: int | None) -> list[str]:
    """The messages for --batch_size / --max_data_loader_n_workers values that cannot work."""
    problems = []
    if batch_size < 1:
        problems.append(f"--batch_size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        problems.append(f"--max_data_loader_n_workers must be 0 or more, got {workers}")
    return problems


def images_to_caption(folder: Path, *, recursive: bool, caption_extension: str) -> list[Path]:
    """The images of train_data_dir, sorted; the folder, the extension and an empty list fail here, before the
    model loads."""
    if not folder.is_dir():
        raise CaptioningError(f"train_data_dir {folder}: no such folder")
    caption_path_for(folder / "x.png", caption_extension)  # an empty extension fails now, not per image
    images = list_images(folder, recursive=recursive)
    if not images:
        raise CaptioningError(f"train_data_dir {folder}: no images ({', '.join(IMAGE_EXTENSIONS)})"
                              + ("" if recursive else "; add --recursive to include subfolders"))
    return images


def load_rgb(path: Path):
    """(PIL RGB image, None) or (None, message); module-level so worker processes can run it."""
    from library.images import ImageError, load_image

    try:
        return load_image(path).rgb, None
    except ImageError as e:
        return None, str(e)


def write_captions(images: list[Path], caption_batch: Callable[[list], list[str]], *, batch_size: int,
                   workers: int | None, caption_extension: str, debug: bool) -> list[str]:
    """`<stem><caption_extension>` beside each image: its caption from `caption_batch` (PIL images -> texts, in
    batches of `batch_size`) and a newline. Returns the problems with single images (the others are written)."""
    from tqdm import tqdm

    problems: list[str] = []

    def caption(batch: list) -> None:
        for (path, _), text in zip(batch, caption_batch([image for _, image in batch])):
            with atomic_file(caption_path_for(path, caption_extension)) as tmp:
                tmp.write_bytes((text + "\n").encode("utf-8"))
            if debug:
                logger.info("%s: %s", path, text)

    batch: list = []
    loaded = ordered_map(load_rgb, images, workers=workers)
    for path, (image, error) in tqdm(zip(images, loaded), total=len(images), desc="captioning", unit="image",
                                     smoothing=0.0):
        if image is None:
            problems.append(error)
            continue
        batch.append((path, image))
        if len(batch) == batch_size:
            caption(batch)
            batch = []
    if batch:
        caption(batch)
    return problems


def exit_status(run: Callable[[], list[str]], *, done: str = "captioned") -> int:
    """A captioner's (or tagger's) main(): 0 when every image got its caption; 1 with the error, or the images not
    `done` (the problems `run` returns)."""
    try:
        problems = run()
    except (ValueError, OSError) as e:  # CaptioningError and the taggers' errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    if problems:
        print(f"error: {len(problems)} image(s) were not {done} (the others were):\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    return 0
