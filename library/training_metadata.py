"""Training metadata of saved models (LoRA files and full checkpoints): kohya's `ss_*` keys.

They describe the run (settings, seed, steps) and the training set (image counts, per-folder tag frequency,
buckets); sd-webui-additional-networks' `sshs_*` hashes identify LoRA weights. All values are strings
(safetensors metadata).
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import random
import time
from pathlib import Path

import torch

from library.captions import tag_frequency
from library.train_dataset import TrainingDataset


def additional_networks_hashes(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None,
                               metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` / `sshs_legacy_hash`, as sd-webui-additional-networks (and kohya) compute them: on the file
    as it would be with only the ss_* metadata, so editing other metadata later does not change them."""
    import safetensors.torch

    tensors = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    data = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def dataset_metadata(dataset: TrainingDataset, summary: dict) -> dict[str, str]:
    """ss_num_train_images, ss_num_reg_images, ss_datasets, ss_bucket_info, ss_tag_frequency, ss_dataset_dirs."""
    records = {str(item.record.path): item.record for item in dataset.items}.values()
    by_dir: dict[str, list] = {}
    for record in records:
        source = record.subset.image_dir or record.subset.metadata_file
        by_dir.setdefault(source.name, []).append(record)
    return {
        "ss_num_train_images": str(summary["num_train_images"]),
        "ss_num_reg_images": str(summary["num_reg_images"]),
        "ss_datasets": json.dumps(summary["datasets"]),
        "ss_bucket_info": json.dumps(summary["datasets"][0]["bucket_info"]) if summary["datasets"] else "",
        "ss_tag_frequency": json.dumps({d: tag_frequency(r.caption for r in rs) for d, rs in by_dir.items()}),
        "ss_dataset_dirs": json.dumps({d: {"n_repeats": rs[0].subset.num_repeats, "img_count": len(rs)}
                                       for d, rs in by_dir.items()}),
    }


def user_modelspec(args) -> dict[str, str]:
    """The modelspec keys the user gave (`--metadata_<name>` -> `modelspec.<name>`, kohya's flags): the thumbnail as
    the data: URL the spec stores, tags without the spaces around commas, true/false lower-case."""
    from library.train_args import MODELSPEC_FLAGS

    keys = {}
    for name in MODELSPEC_FLAGS:
        value = getattr(args, f"metadata_{name}", None)
        if value is None:
            continue
        if name == "thumbnail":
            path = Path(value)
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            value = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
        elif name == "tags":
            value = ",".join(tag.strip() for tag in value.split(",") if tag.strip())
        elif name == "is_negative_embedding":
            value = value.lower()
        keys[f"modelspec.{name}"] = value
    return keys


def run_metadata(args, *, dataset: TrainingDataset, data_summary: dict, seed: int, max_train_steps: int,
                 resolution: str) -> dict[str, str]:
    """The ss_* keys every trainer writes (kohya's names): the run's settings and the training set; and the
    modelspec keys the user gave (`user_modelspec`)."""
    metadata = dataset_metadata(dataset, data_summary)
    metadata.update(user_modelspec(args))
    metadata.update({
        "ss_session_id": str(random.randint(0, 2 ** 32)), "ss_training_started_at": str(time.time()),
        "ss_output_name": args.output_name or "last", "ss_learning_rate": str(args.learning_rate),
        "ss_max_train_steps": str(max_train_steps), "ss_seed": str(seed), "ss_lr_scheduler": args.lr_scheduler,
        "ss_lr_warmup_steps": str(args.lr_warmup_steps), "ss_optimizer": args.optimizer_type or "AdamW",
        "ss_mixed_precision": args.mixed_precision, "ss_full_fp16": str(args.full_fp16),
        "ss_gradient_checkpointing": str(args.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_batch_size_per_device": str(args.train_batch_size), "ss_resolution": resolution,
        "ss_clip_skip": str(args.clip_skip), "ss_max_token_length": str(args.max_token_length),
        "ss_cache_latents": str(args.cache_latents), "ss_enable_bucket": str(args.enable_bucket),
        "ss_min_bucket_reso": str(args.min_bucket_reso), "ss_max_bucket_reso": str(args.max_bucket_reso),
        "ss_bucket_no_upscale": str(args.bucket_no_upscale), "ss_flip_aug": str(args.flip_aug),
        "ss_resize_interpolation": str(args.resize_interpolation),
        "ss_random_crop": str(args.random_crop), "ss_shuffle_caption": str(args.shuffle_caption),
        "ss_keep_tokens": str(args.keep_tokens), "ss_noise_offset": str(args.noise_offset),
        "ss_min_snr_gamma": str(args.min_snr_gamma), "ss_prior_loss_weight": str(args.prior_loss_weight),
        "ss_loss_type": args.loss_type, "ss_zero_terminal_snr": str(args.zero_terminal_snr),
        "ss_training_comment": str(getattr(args, "training_comment", None)),
        "ss_sd_model_name": Path(args.pretrained_model_name_or_path).name,
        # kohya's validation keys
        "ss_validation_seed": str(getattr(args, "validation_seed", None)),
        "ss_validation_split": str(getattr(args, "validation_split", None)),
        "ss_max_validation_steps": str(getattr(args, "max_validation_steps", None)),
        "ss_num_validation_images": str(data_summary.get("num_validation_images", 0)),
    })
    return metadata
