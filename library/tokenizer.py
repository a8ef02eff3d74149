"""CLIP tokenizers for Stable Diffusion text encoders, built from files shipped in the repo.

Every SD text encoder (SD 1.x: openai CLIP ViT-L/14; SD 2.x: OpenCLIP ViT-H/14; SDXL: both
ViT-L/14 and OpenCLIP ViT-bigG/14) uses the same 49,408-token byte-level BPE vocabulary. The
families differ only in how a prompt is padded to 77 tokens, so one set of data files
(``library/model_configs/tokenizer/``, produced by ``tools/dev/build_tokenizer_data.py``)
plus a :class:`PadStyle` covers all of them, and the hub is never contacted.

Class choice: transformers 5 has a single ``CLIPTokenizer`` backed by the Rust ``tokenizers``
library (``CLIPTokenizerFast`` is now an alias of it); the Python "slow" CLIP tokenizer that
ran ftfy was removed, so there is nothing to choose between. That is also the class
diffusers loads for a pipeline's ``tokenizer`` folder. Its ids equal openai CLIP's
``SimpleTokenizer`` except where that one would have changed the text first
(``ftfy.fix_text`` + HTML unescaping: curly quotes, ``&amp;``, full-width characters,
mojibake). The hub's own tokenizers have the same gap.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

from transformers import CLIPTokenizer

TOKENIZER_DATA_DIR = Path(__file__).resolve().parent / "model_configs" / "tokenizer"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # context length of every CLIP text encoder used by SD


class PadStyle(enum.Enum):
    """The token a family pads its 77-token prompts with (it changes the text embedding)."""

    # SD 1.x and SDXL text_encoder: openai CLIP / the hub's openai/clip-vit-large-patch14
    # pad with <|endoftext|> (49407).
    EOS = EOS_TOKEN
    # SD 2.x and SDXL text_encoder_2: open_clip.tokenize pads with id 0, which is the token "!"
    # (the first byte-level symbol), as in stabilityai/stable-diffusion-2's tokenizer folder.
    ZERO = "!"


def load_clip_tokenizer(pad_style: PadStyle, model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP tokenizer for ``pad_style``'s model family, read from the shipped files only."""
    pad_style = PadStyle(pad_style)
    return CLIPTokenizer.from_pretrained(
        TOKENIZER_DATA_DIR,
        local_files_only=True,  # the folder has everything; never look at the hub
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,  # as openai's; byte-level BPE never actually produces unk
        pad_token=pad_style.value,
        model_max_length=model_max_length,
        # transformers registers the pad token as a special token and then splits it out of
        # the text. For "!" that would turn a typed "!" into id 0 instead of the BPE token
        # "!</w>" (256), and "!!" into 0, 0 instead of 748 (diffusers issue #4153: the hub's
        # SD 2.x / SDXL tokenizers do this, but open_clip, which those text encoders were
        # trained with, does not). Encoding special tokens as plain text is exactly open_clip's
        # behaviour: it has no in-text special tokens at all. BOS/EOS/padding ids are added by
        # the tokenizer's post-processing and are unaffected.
        split_special_tokens=pad_style is PadStyle.ZERO,
    )


def save_tokenizer(tokenizer: CLIPTokenizer, dest_dir: str | Path) -> list[Path]:
    """Write ``tokenizer`` as a diffusers pipeline's ``tokenizer`` folder; returns the paths.

    Writes ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and
    ``tokenizer_config.json``, the layout of the hub's SD pipelines, readable by
    ``CLIPTokenizer.from_pretrained(dest_dir)`` in transformers 4 and 5.
    ``tokenizer.save_pretrained`` is not used: in transformers 5 it writes ``tokenizer.json``
    and ``tokenizer_config.json`` only (plus machine-local keys such as ``is_local``).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)

    # The BPE model writes vocab.json / merges.txt in the same format as the hub (and as
    # the shipped files, byte for byte).
    paths = [Path(p) for p in tokenizer.backend_tokenizer.model.save(str(dest_dir))]

    special = {
        "bos_token": str(tokenizer.bos_token),
        "eos_token": str(tokenizer.eos_token),
        "pad_token": str(tokenizer.pad_token),
        "unk_token": str(tokenizer.unk_token),
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        **special,
        "model_max_length": tokenizer.model_max_length,
        "split_special_tokens": bool(tokenizer.split_special_tokens),
        # Tokens added on top of the BPE vocabulary (e.g. textual-inversion placeholders)
        # live outside vocab.json; record them with their ids so they survive the round trip.
        "added_tokens_decoder": {
            str(idx): {
                "content": tok.content,
                "lstrip": tok.lstrip,
                "normalized": tok.normalized,
                "rstrip": tok.rstrip,
                "single_word": tok.single_word,
                "special": tok.special,
            }
            for idx, tok in sorted(tokenizer.added_tokens_decoder.items())
        },
    }
    for name, data in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
        path = dest_dir / name
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
