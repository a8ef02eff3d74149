"""GIT image captioning as kohya's finetune/make_captions_by_git.py does it: transformers' GitForCausalLM and its
processor (kohya's default model is microsoft/git-large-textcaps), generate() from the image alone with
--max_length, the output decoded without special tokens; --remove_words then cuts the text GIT claims to read in
the image.

Why --remove_words: git-large-textcaps was trained on TextCaps, captions of images with text in them, so it
describes "a sign that says stop" or "a shirt with the words hello on it" also where the text is made up; a caption
like that would teach a model to draw the words. kohya removes such phrases with a list of patterns, applied one
after the other, every occurrence, in this order (the same rules written here; tests/test_make_captions_by_git.py
shows each on fixed captions).
"""

from __future__ import annotations

import re
from pathlib import Path

from library.folder_captioning import download_hint, load_pretrained, local_model_folder

KOHYA_DEFAULT_MODEL = "microsoft/git-large-textcaps"

_QUOTED = r'"[^"]*"'  # a double-quoted text, up to the next double quote
TEXT_PHRASES = [re.compile(p) for p in (
    # 'with the words "hello world" on the shirt', 'has the name bob', 'and the letter a is in red'
    rf"(?:has|with|and) the (?:words?|letters?|name) (?:{_QUOTED}|\w+)"
    r"(?: ?(?:is )?(?:on|in) (?:the |her |their |him )?\w+)?",
    # '(with a sign) that says "stop" (on it)', 'that says hello'
    rf"(?:with a sign )?that says ?(?:{_QUOTED}|\w+)(?: ?on it)?",
    # the same in single quotes, where an "i'm" right after the opening quote does not close it
    r"(?:with a sign )?that says ?(?:' ?(?:i'm)?[^']*'|\w+)(?: ?on it)?",
    r"with the number \d+ on (?:it|\w+ \w+)",  # 'with the number 23 on the back'
    r'with the words "',  # an opening quote left without its closing one
    r"word \w+ on it",
    r"that says the word \w+ on it",
    r"that says'the word \"(?: on it)?",
)]


def remove_text_phrases(caption: str) -> str:
    """kohya's --remove_words: every phrase of TEXT_PHRASES cut, in order. Unlike kohya's, the spaces a cut leaves
    (a double space inside, one at the end) are tidied to single spaces; the words are the same."""
    for pattern in TEXT_PHRASES:
        caption = pattern.sub("", caption)
    return " ".join(caption.split())


def model_folder(model_id: str) -> Path:
    """The local transformers folder of --model_id (a GIT model); a hub id is refused with how to get it here."""
    return local_model_folder(model_id, "--model_id", "git", download_hint(KOHYA_DEFAULT_MODEL, "--model_id"))


def load_model(folder: Path, device):
    """(GitForCausalLM in eval mode on `device`, its processor), from local files only."""
    from transformers import AutoProcessor, GitForCausalLM

    return load_pretrained(folder, GitForCausalLM, AutoProcessor, device,
                           f"a GIT captioning model (GitForCausalLM, as {KOHYA_DEFAULT_MODEL})")


def caption_batch(model, processor, images: list, *, max_length: int) -> list[str]:
    """One caption per PIL RGB image: greedy generate() (GIT's generation config) from the image alone, decoded."""
    import torch

    device = next(model.parameters()).device
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, max_length=max_length)
    return processor.batch_decode(out, skip_special_tokens=True)
