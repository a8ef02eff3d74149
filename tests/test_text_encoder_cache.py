"""The text-encoder output cache against the encoders themselves: for every caption of a dataset, the cached
conditioning (with each batch's size/crop ids added) equals what the family's conditioner computes, for SDXL and
SD 1.x; the encoders are released; a disk entry is keyed by caption, model and settings.

Tolerance: FP32_OUTPUT_REL (tests/numerics.py): the cache encodes captions in batches of up to 8, the conditioner
here encodes the batch under test, and a caption encoded beside others may differ from itself alone in the last
bits (measured on an AMD EPYC: 3.2e-7 relative at most with native kernels, 1.0e-7 under
ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2). Planted: the cache answering every caption with the first
caption's outputs moves the hidden states by 0.37 relative (750x the tolerance). The time ids come from the batch's
sizes on both paths and must be equal exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from library.buckets import BucketAssigner, BucketConfig
from library.captions import CaptionOptions
from library.dataset_sources import Subset, scan_subset
from library.text_conditioning import CaptionEncoding, SizeConditioning, conditioner_for
from library.text_encoder_cache import TextEncoderOutputCache, check_captions_are_fixed
from library.tiny_models import fresh_tiny_models
from library.train_dataset import DatasetGroup, TrainingDataset
from tests.numerics import assert_outputs_close
from tools.make_synthetic_dataset import write_dataset


def dataset_of(folder, caption: CaptionOptions = CaptionOptions()) -> TrainingDataset:
    records, _ = scan_subset(Subset(image_dir=folder, caption=caption))
    assigner = BucketAssigner(BucketConfig(resolution=(64, 64)))
    return TrainingDataset([DatasetGroup([(r, 1) for r in records], assigner, 1)], seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("te_cache"), images=10, size=64, seed=3)


@pytest.mark.numbers
@pytest.mark.parametrize("family", ["sdxl", "sd1"])
def test_cached_conditioning_equals_the_encoders(images, family):
    models = fresh_tiny_models(family)
    conditioner = conditioner_for(models.family, models.tokenizers, models.text_encoders,
                                  CaptionEncoding(max_token_length=150, weighted=True))
    dataset = dataset_of(images, CaptionOptions(caption_prefix="(sks:1.2)"))
    cache = TextEncoderOutputCache(conditioner)
    cache.build(dataset)
    captions = [dataset.fixed_caption(item) for item in dataset.items]
    assert len(cache.entries) == len(set(captions)) > 3
    cached = cache.conditioner_for_training("cpu")
    sizes = [SizeConditioning((96 + i, 64), (i, 2 * i), (64, 64)) for i in range(3)]
    for start in range(0, len(captions), 3):
        batch = captions[start:start + 3]
        want, got = conditioner(batch, sizes[:len(batch)]), cached(batch, sizes[:len(batch)])
        assert_outputs_close(got.hidden_states, want.hidden_states, what=f"{family} hidden states, cached vs encoded")
        if family == "sdxl":
            assert_outputs_close(got.pooled, want.pooled, what="pooled, cached vs encoded")
            assert torch.equal(got.added_cond["time_ids"], want.added_cond["time_ids"])
            assert got.added_cond["text_embeds"] is got.pooled
        else:
            assert got.pooled is None and got.added_cond is None
    with pytest.raises(ValueError, match="not in the text-encoder cache"):
        cached(["a caption nobody wrote"], sizes[:1])


def test_release_moves_the_weights_off_the_machine():
    from library.text_encoder_cache import release_text_encoders

    models = fresh_tiny_models("sdxl")
    release_text_encoders(models.text_encoders)
    assert all(p.device.type == "meta" for te in models.text_encoders for p in te.parameters())
    with pytest.raises(RuntimeError, match="was released after --cache_text_encoder_outputs"):
        models.text_encoders[0](torch.tensor([[49406, 49407]]))


def test_disk_key_names_caption_models_and_settings(images):
    models = fresh_tiny_models("sdxl")
    conditioner = conditioner_for(models.family, models.tokenizers, models.text_encoders)
    cache = TextEncoderOutputCache(conditioner, to_disk=True)
    cache.build(dataset_of(images))
    entry = sorted(images.glob("*_te_outputs.safetensors"))[0]
    from library.safetensors_io import SafetensorsReader

    with SafetensorsReader(entry) as reader:
        key = json.loads(reader.metadata["cache_key"])
    assert key["caption"] == (images / entry.name.replace("_te_outputs.safetensors", ".caption")).read_text().strip()
    assert key["encoding"] == {"max_token_length": None, "clip_skip": None, "weighted": False, "pad_to_longest": False,
                               "weight_normalization": "original"}
    assert len(key["encoders"]) == 2 and key["dtype"] == "torch.float32" and key["conditioner"] == "SDXLTextConditioner"
    # Another model (one weight changed) makes every entry stale.
    other = fresh_tiny_models("sdxl")
    with torch.no_grad():
        other.text_encoders[1].get_input_embeddings().weight[0, 0] += 1
    again = TextEncoderOutputCache(conditioner_for(other.family, other.tokenizers, other.text_encoders), to_disk=True)
    assert again._load_disk(images / entry.name.replace("_te_outputs.safetensors", ".png"), key["caption"]) == "stale"
    for path in images.glob("*_te_outputs.safetensors"):
        path.unlink()


def test_per_step_caption_options_are_named(images):
    dataset = dataset_of(images, CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.1,
                                                token_warmup_step=5))
    with pytest.raises(ValueError) as info:
        check_captions_are_fixed(dataset)
    message = str(info.value)
    for flag in ("--shuffle_caption", "--caption_tag_dropout_rate", "--token_warmup_step", str(images)):
        assert flag in message, message
