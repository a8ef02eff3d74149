"""BLIP image captioning as kohya's finetune/make_captions.py does it, on transformers' BlipForConditionalGeneration
(kohya vendors Salesforce's original BLIP code and its .pth checkpoint; transformers has the same model, converted
by Salesforce as `Salesforce/blip-image-captioning-large`, which kohya's default weights are).

kohya's decoding, kept: the decoder starts from the prompt "a picture of " (its [CLS] replaced by BLIP's [DEC]
start token, the closing [SEP] dropped), which is cut from the decoded caption; nucleus sampling (top_p, with a
repetition penalty of 1.1) by default, beam search with --beam_search (no penalty); --max_length / --min_length
count the prompt's tokens too. Images are resized to the model's input size (bicubic), scaled to 0..1 and
normalised with CLIP's mean and std: BlipProcessor's preprocessing and kohya's torchvision transform alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from library.folder_captioning import CaptioningError, download_hint, load_pretrained, local_model_folder

PROMPT = "a picture of "  # kohya's (and Salesforce BLIP's) captioning prompt
KOHYA_DEFAULT_WEIGHTS = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large_caption.pth"
TRANSFORMERS_EQUIVALENT = "Salesforce/blip-image-captioning-large"


def model_folder(model_dir: str | None, caption_weights: str | None) -> Path:
    """The local transformers folder of the BLIP model: --model_dir, or --caption_weights when it names a folder.
    Nothing is downloaded: a URL or kohya's original .pth file is refused with what to use instead."""
    how = download_hint(TRANSFORMERS_EQUIVALENT, "--model_dir")
    given = model_dir or caption_weights
    flag = "--model_dir" if model_dir else "--caption_weights"
    if not given or given == KOHYA_DEFAULT_WEIGHTS or "://" in given:
        raise CaptioningError(f"{flag} {given or '(none)'}: nothing is downloaded here; {how}")
    if Path(given).is_file():
        raise CaptioningError(f"{flag} {given}: a single weights file (kohya's original BLIP checkpoint, "
                              "model_large_caption.pth) is not read here; this tool runs transformers' BLIP from "
                              f"a model folder (config.json, weights, processor files): {how}")
    return local_model_folder(given, flag, "blip", how)


def load_model(folder: Path, device):
    """(model in eval mode on `device`, processor), from local files only."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    return load_pretrained(folder, BlipForConditionalGeneration, BlipProcessor, device,
                           f"a BLIP captioning model (BlipForConditionalGeneration + BlipProcessor, as "
                           f"{TRANSFORMERS_EQUIVALENT})")


@dataclass(frozen=True)
class Decoding:
    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5

    def generate_kwargs(self) -> dict:
        if self.beam_search:
            return {"do_sample": False, "num_beams": self.num_beams, "max_length": self.max_length,
                    "min_length": self.min_length}
        return {"do_sample": True, "top_p": self.top_p, "max_length": self.max_length,
                "min_length": self.min_length, "repetition_penalty": 1.1, "num_return_sequences": 1}


def prompt_ids(processor, batch_size: int):
    """The prompt's token ids for a batch: [CLS] a picture of [SEP]; generate() swaps in [DEC] and drops [SEP]."""
    ids = processor.tokenizer(PROMPT, return_tensors="pt").input_ids
    return ids.repeat(batch_size, 1)


def caption_batch(model, processor, images: list, decoding: Decoding) -> list[str]:
    """One caption per PIL RGB image (the global torch generator drives sampling: seed it once before)."""
    import torch

    device = next(model.parameters()).device
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, input_ids=prompt_ids(processor, len(images)).to(device),
                             **decoding.generate_kwargs())
    return [strip_prompt(text) for text in processor.batch_decode(out, skip_special_tokens=True)]


def strip_prompt(text: str) -> str:
    """The decoded text without the prompt (kohya cuts len(PROMPT) characters; the same for every output that
    starts with the prompt, which all do: generation continues it)."""
    head = PROMPT.strip()
    return text[len(head):].strip() if text.startswith(head) else text.strip()

