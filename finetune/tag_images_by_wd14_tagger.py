"""Tag images with a WD14 tagger (SmilingWolf's ONNX models) through onnxruntime (kohya's
finetune/tag_images_by_wd14_tagger.py; its flags and output files).

    python finetune/tag_images_by_wd14_tagger.py images --model_dir wd14_tagger_model \\
        --repo_id SmilingWolf/wd-v1-4-convnext-tagger-v2 --onnx --batch_size 4 --thresh 0.35 \\
        [--general_threshold X] [--character_threshold Y] [--remove_underscore] [--undesired_tags "a,b"] \\
        [--use_rating_tags | --use_rating_tags_as_last_tag] [--character_tags_first] [--always_first_tags "1girl"]

writes `images/<stem>.txt` (--caption_extension) for each image: its tags joined by --caption_separator (", "),
then a newline; merge them into fine-tune metadata with `finetune/merge_dd_tags_to_metadata.py images meta.json`
(same default extension), or train on them directly with `--caption_extension .txt`.
--output_path meta.json (or .jsonl) writes one metadata file instead: `{image path: {"tags", "image_size"}}`
(JSON Lines: `{"image_path", "caption", "image_size"}`), as kohya.

The model comes from a local folder, never from the internet: `--model_dir` holding `model.onnx` and
`selected_tags.csv` (a SmilingWolf repo's files), or kohya's download location `<model_dir>/<namespace>_<name>`
for --repo_id (kohya's default model_dir is wd14_tagger_model). A --repo_id with a subfolder
(`namespace/name/sub`) is kohya's second layout: `model_optimized.onnx` + `tag_mapping.json`.

Which tags (kohya's rules):
- SmilingWolf's models: general tags at or above --general_threshold and character tags at or above
  --character_threshold (both default to --thresh, 0.35), in the label file's order; --character_tags_first
  puts each character tag in front (so several appear in reverse order); --use_rating_tags adds the most likely
  rating in front (after that), --use_rating_tags_as_last_tag at the end.
- tag_mapping.json models: sigmoid of the outputs; general, character, copyright, meta, model and artist tags over
  their thresholds (--copyright_threshold etc., default --thresh) sorted by probability, character tags first with
  --character_tags_first; the best quality and rating tags (among those over the lowest threshold) with
  --use_quality_tags(_as_last_tag) / --use_rating_tags(_as_last_tag).
- --undesired_tags are never output; --always_first_tags present move to the front one after the other (the last
  one listed ends up first); both are split at --caption_separator. Names are rewritten first:
  --character_tag_expand (`name_(series)` -> `name, series`), --remove_underscore (tags longer than 3
  characters), then --tag_replacement `source,target;...` (`\\,` / `\\;` escape). --append_tags keeps an existing
  file's tags and adds the new ones it lacks. --frequency_tags prints how often each tag was written.

Differs from kohya, on purpose: ONNX only (kohya's default without --onnx runs the TensorFlow SavedModel;
--onnx is accepted and implied); nothing is downloaded (--force_download is refused); --tag_replacement works
for SmilingWolf's models (kohya's replaces nothing there); --always_first_tags entries are stripped, so
"1girl, 1boy" works with the default separator; the last batch of a fixed-batch model is padded instead of
failing; EXIF rotation is applied before tagging, as the trainers apply it; the --output_path keys are
absolute paths; every file is written atomically. An unreadable image is reported by name and the others are
still tagged (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library import wd14_tagger as wd  # noqa: E402
from library.atomic_files import atomic_file, check_writable_output  # noqa: E402
from library.captions import CaptionFileError, caption_path_for, read_caption_file  # noqa: E402
from library.folder_captioning import exit_status  # noqa: E402
from library.images import IMAGE_EXTENSIONS, list_images  # noqa: E402
from library.metadata_files import write_metadata  # noqa: E402
from library.ordered_prefetch import ordered_map  # noqa: E402

logger = logging.getLogger("wd14_tagger")

# Flags that only tag_mapping.json models have categories for.
JSON_ONLY_FLAGS = ("meta_threshold", "model_threshold", "copyright_threshold", "artist_threshold",
                   "use_quality_tags", "use_quality_tags_as_last_tag")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of the images to tag")
    p.add_argument("--repo_id", default=None,
                   help=f"the model's Hugging Face id, to find kohya's download folder <model_dir>/<namespace>_<name> "
                        f"(default {wd.DEFAULT_REPO_ID}, or the files directly in --model_dir)")
    p.add_argument("--model_dir", default="wd14_tagger_model",
                   help="folder holding model.onnx + selected_tags.csv, or kohya's download folder")
    p.add_argument("--force_download", action="store_true", help="refused: nothing is downloaded here")
    p.add_argument("--batch_size", type=int, default=1, help="images per model call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="read and prepare images in this many worker processes (default: in the main process)")
    p.add_argument("--output_path", default=None,
                   help="write one metadata file (.json, or .jsonl) instead of a tag file per image")
    p.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)  # kohya's misspelled alias
    p.add_argument("--caption_extension", default=".txt", help="extension of the tag files (default .txt)")
    p.add_argument("--thresh", type=float, default=0.35, help="probability needed for a tag (default 0.35)")
    for category in ("general", "character", "meta", "model", "copyright", "artist"):
        p.add_argument(f"--{category}_threshold", type=float, default=None,
                       help=f"threshold of {category} tags (default --thresh; above 1 turns them off)"
                            + ("" if category in ("general", "character") else "; tag_mapping.json models"))
    p.add_argument("--recursive", action="store_true", help="also tag images in subfolders")
    p.add_argument("--remove_underscore", action="store_true", help="underscores to spaces (tags over 3 characters)")
    p.add_argument("--debug", action="store_true", help="log each image's tags")
    p.add_argument("--undesired_tags", default="", help="tags never to output, separated by --caption_separator")
    p.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    p.add_argument("--onnx", action="store_true", help="accepted: the ONNX model is the only one this tool runs")
    p.add_argument("--append_tags", action="store_true", help="add the new tags to existing tag files")
    p.add_argument("--use_rating_tags", action="store_true", help="the most likely rating tag first")
    p.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="the most likely rating tag last")
    p.add_argument("--use_quality_tags", action="store_true", help="the best quality tag first (tag_mapping.json)")
    p.add_argument("--use_quality_tags_as_last_tag", action="store_true",
                   help="the best quality tag last (tag_mapping.json models)")
    p.add_argument("--character_tags_first", action="store_true", help="character tags before general tags")
    p.add_argument("--always_first_tags", default=None,
                   help="tags to put first when present, e.g. '1girl,1boy' (the last listed ends up first)")
    p.add_argument("--caption_separator", default=", ", help="between tags in the output (default ', ')")
    p.add_argument("--tag_replacement", default=None,
                   help="rename tags: 'source1,target1;source2,target2' (escape , and ; in a tag as \\, \\;)")
    p.add_argument("--character_tag_expand", action="store_true",
                   help="'name_(series)' becomes 'name' + separator + 'series'")
    return p


def tag_options(args: argparse.Namespace) -> wd.TagOptions:
    def threshold(name: str) -> float:
        value = getattr(args, f"{name}_threshold")
        return args.thresh if value is None else value

    return wd.TagOptions(
        thresh=args.thresh, general_threshold=threshold("general"), character_threshold=threshold("character"),
        other_thresholds={c: threshold(c) for c in wd.OTHER_CATEGORIES},
        undesired_tags=frozenset(wd.split_tag_list(args.undesired_tags, args.caption_separator)),
        always_first_tags=tuple(wd.split_tag_list(args.always_first_tags, args.caption_separator)),
        character_tags_first=args.character_tags_first, use_rating_tags=args.use_rating_tags,
        use_rating_tags_as_last_tag=args.use_rating_tags_as_last_tag, use_quality_tags=args.use_quality_tags,
        use_quality_tags_as_last_tag=args.use_quality_tags_as_last_tag)


def open_session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise wd.TaggerError("onnxruntime is not installed: `pip install onnxruntime` (or onnxruntime-gpu for a "
                             "CUDA GPU), as listed in requirements.txt") from None
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider") if p in available][:1]
    try:
        session = ort.InferenceSession(str(path), providers=providers + ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable / invalid models
        raise wd.TaggerError(f"{path}: onnxruntime cannot load it ({e})") from None
    logger.info("loaded %s (%s)", path, ", ".join(session.get_providers()))
    return session


def input_geometry(session, labels: wd.Labels, batch_size: int) -> tuple[str, int, int]:
    """(input name, image size, batch size): the size from the model's input shape (NHWC, or NCHW for the json
    layout); a model with a fixed batch size gets batches of that size (kohya)."""
    model_input = session.get_inputs()[0]
    shape = list(model_input.shape)
    channels = None if len(shape) != 4 else shape[1] if labels.json_layout else shape[3]
    if len(shape) != 4 or (isinstance(channels, int) and channels != 3):
        raise wd.TaggerError(f"model input {model_input.name} has shape {shape}; expected "
                             + ("[batch, 3, height, width]" if labels.json_layout else "[batch, height, width, 3]"))
    size_dims = shape[2:4] if labels.json_layout else shape[1:3]
    sizes = [d for d in size_dims if isinstance(d, int) and d > 0]
    size = sizes[0] if sizes else wd.DEFAULT_IMAGE_SIZE
    outputs = session.get_outputs()[0].shape
    # SmilingWolf's CSV names every output; kohya's tag_mapping.json may leave outputs out (they are skipped)
    if outputs and isinstance(outputs[-1], int) and (outputs[-1] < len(labels) if labels.json_layout
                                                     else outputs[-1] != len(labels)):
        raise wd.TaggerError(f"the model has {outputs[-1]} outputs but its label file has {len(labels)} labels; "
                             "the two files come from different models")
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if fixed is not None and fixed != batch_size:
        logger.warning("--batch_size %d: the model takes batches of %d; using %d", batch_size, fixed, fixed)
        batch_size = fixed
    return model_input.name, size, batch_size


def run(args: argparse.Namespace) -> list[str]:
    """Tag the folder; returns the problems with single images (the others are written)."""
    from tqdm import tqdm

    if args.force_download:
        raise wd.TaggerError("--force_download: this tool never downloads; put the model's files in --model_dir")
    if args.batch_size < 1:
        raise wd.TaggerError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_data_loader_n_workers is not None and args.max_data_loader_n_workers < 0:
        raise wd.TaggerError(f"--max_data_loader_n_workers must be 0 or more, got {args.max_data_loader_n_workers}")
    if args.use_rating_tags and args.use_rating_tags_as_last_tag:
        raise wd.TaggerError("--use_rating_tags and --use_rating_tags_as_last_tag: give one (first or last)")
    if args.use_quality_tags and args.use_quality_tags_as_last_tag:
        raise wd.TaggerError("--use_quality_tags and --use_quality_tags_as_last_tag: give one (first or last)")
    folder = Path(args.train_data_dir)
    if not folder.is_dir():
        raise wd.TaggerError(f"train_data_dir {folder}: no such folder")
    if args.output_path:
        check_writable_output(args.output_path)
        if Path(args.output_path).suffix.lower() not in (".json", ".jsonl"):
            raise wd.TaggerError(f"--output_path {args.output_path}: give a .json or .jsonl file name")
    images = list_images(folder, recursive=args.recursive)
    if not images:
        raise wd.TaggerError(f"train_data_dir {folder}: no images ({', '.join(IMAGE_EXTENSIONS)})"
                             + ("" if args.recursive else "; add --recursive to include subfolders"))
    label_options = wd.LabelOptions(caption_separator=args.caption_separator,
                                    character_tag_expand=args.character_tag_expand,
                                    remove_underscore=args.remove_underscore,
                                    replacements=wd.parse_tag_replacement(args.tag_replacement))
    files = wd.find_model(Path(args.model_dir), args.repo_id)
    labels = wd.read_labels(files, label_options)
    if not labels.json_layout:
        given = [f"--{flag}" for flag in JSON_ONLY_FLAGS if getattr(args, flag) not in (None, False)]
        if given:
            logger.warning("%s: %s has no such categories (only rating, general and character tags), so this "
                           "changes nothing", ", ".join(given), files.labels)
    if not args.onnx:
        logger.info("running the ONNX model %s (kohya runs the TensorFlow model unless --onnx is given)", files.onnx)
    options = tag_options(args)
    session = open_session(files.onnx)
    input_name, size, batch_size = input_geometry(session, labels, args.batch_size)
    logger.info("%d image(s), model input %dx%d, batches of %d", len(images), size, size, batch_size)

    frequencies: dict[str, int] = {}
    metadata: dict[str, dict] = {}
    problems: list[str] = []

    def tag_batch(batch: list[tuple[Path, np.ndarray, tuple[int, int]]]) -> None:
        inputs = np.stack([x for _, x, _ in batch])
        if len(batch) < batch_size:  # a fixed-batch model needs full batches: pad, then drop the padding's rows
            inputs = np.concatenate([inputs, np.zeros((batch_size - len(batch), *inputs.shape[1:]), inputs.dtype)])
        outputs = session.run(None, {input_name: inputs})[0][:len(batch)]
        for (path, _, image_size), probs in zip(batch, outputs):
            tags = wd.choose_tags(probs, labels, options)
            for tag in tags:
                frequencies[tag] = frequencies.get(tag, 0) + 1
            tag_file = caption_path_for(path, args.caption_extension)
            if args.append_tags:
                try:
                    existing = read_caption_file(tag_file)
                except CaptionFileError as e:
                    problems.append(str(e))
                    continue
                if existing is not None:
                    tags = wd.merge_with_existing(existing, tags, args.caption_separator)
            text = args.caption_separator.join(tags)
            if args.debug:
                logger.info("%s: %s", path, text)
            if args.output_path:
                key = os.path.abspath(path)
                metadata[key] = ({"caption": text} if args.output_path.lower().endswith(".jsonl")
                                 else {"tags": text}) | {"image_size": list(image_size)}
            else:
                with atomic_file(tag_file) as tmp:
                    tmp.write_bytes((text + "\n").encode("utf-8"))

    batch: list = []
    prepared = ordered_map(wd.prepare_image, images, size, labels.json_layout,
                           workers=args.max_data_loader_n_workers)
    for path, (pixels, size_or_error) in tqdm(zip(images, prepared), total=len(images), desc="tagging",
                                              unit="image", smoothing=0.0):
        if pixels is None:
            problems.append(size_or_error)
            continue
        batch.append((path, pixels, size_or_error))
        if len(batch) == batch_size:
            tag_batch(batch)
            batch = []
    if batch:
        tag_batch(batch)

    if args.output_path:
        write_metadata(Path(args.output_path), metadata)
        logger.info("wrote %s (%d images)", args.output_path, len(metadata))
    if args.frequency_tags:
        print("Tag frequencies:")
        for tag, count in sorted(frequencies.items(), key=lambda item: item[1], reverse=True):
            print(f"{tag}: {count}")
    return problems


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    if args.caption_extention:
        args.caption_extension = args.caption_extention
    return exit_status(lambda: run(args), done="tagged")


if __name__ == "__main__":
    sys.exit(main())
