"""Metadata of trained network files (LoRA...): the parts derived from data rather than from flags.

kohya's `ss_*` keys describe the training set (image counts, per-folder tag frequency, buckets), and
sd-webui-additional-networks' `sshs_*` hashes identify the weights. All values are strings (safetensors metadata).
"""

from __future__ import annotations

import hashlib
import json

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
