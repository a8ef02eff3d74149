"""finetune/make_captions_by_git.py on a tiny random-weight GIT (transformers' GitForCausalLM, built from a config
and saved with its processor): one caption file per image holding exactly what GIT's generate() gives for the
image and --max_length, decoded without special tokens; kohya's --remove_words rules on fixed captions; the model
folder rules (a hub id is not downloaded; a folder that is not a GIT model is refused) with nothing written.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from finetune.make_captions_by_git import main
from library import git_captioning as git

WORDS = ["a", "man", "cat", "dog", "red", "blue", "sign", "on", "the", "table", "sitting", "with", "small", "large",
         "bird", "tree", "##s", "in", "sky", "that", "says", "words", "stop"]


@pytest.fixture(scope="module")
def git_dir(tmp_path_factory):
    from transformers import BertTokenizer, GitConfig, GitForCausalLM, GitProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("git")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    # GIT's processor as microsoft/git-large-textcaps' (CLIP image preprocessing, BERT tokenizer), at 16 px
    processor = GitProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16},
                                                                   crop_size={"height": 16, "width": 16}),
                             tokenizer=BertTokenizer(vocab=vocab))
    # a wider vision init than GIT's 0.02, so that the pixels move the image features and the captions
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8, initializer_range=0.5)
    config = GitConfig(vision_config=vision, vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=40,
                       bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"])
    torch.manual_seed(0)
    model = GitForCausalLM(config)
    with torch.no_grad():  # sharper logits, and more weight on what the text attends to (the image) than the
        model.output.weight.mul_(30)  # init's: otherwise every image gets the same caption
        model.git.encoder.layer[0].attention.self.value.weight.mul_(30)
        model.git.encoder.layer[0].attention.output.dense.weight.mul_(30)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def expected(git_dir, paths, max_length: int) -> list[str]:
    """GIT's own generate() on the images, as its model card calls it, decoded without special tokens."""
    from transformers import AutoProcessor, GitForCausalLM

    processor = AutoProcessor.from_pretrained(git_dir)
    model = GitForCausalLM.from_pretrained(git_dir).eval()
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, max_length=max_length)
    return processor.batch_decode(out, skip_special_tokens=True)


def test_captions_are_gits_own(git_dir, images):
    assert main([str(images), "--model_id", str(git_dir), "--batch_size", "2", "--max_length", "12"]) == 0
    paths = sorted(images.glob("*.png"))
    want = expected(git_dir, paths[:2], 12) + expected(git_dir, paths[2:], 12)
    assert [p.with_suffix(".caption").read_bytes() for p in paths] == [(w + "\n").encode() for w in want]
    # captions of several words that differ per image, of different lengths within a batch (one ended by its EOS)
    assert len(set(want)) == len(want) and len(want[0].split()) > len(want[1].split()) >= 3
    assert not (images / "sub" / "deep.caption").exists()  # not without --recursive


def test_recursive_extension_and_max_length(git_dir, images):
    assert main([str(images), "--model_id", str(git_dir), "--recursive", "--caption_extension", "txt",
                 "--batch_size", "4", "--max_length", "6"]) == 0
    paths = sorted(images.rglob("*.png")) + sorted(images.rglob("*.jpg"))
    want = expected(git_dir, paths, 6)
    assert [p.with_suffix(".txt").read_text() for p in paths] == [w + "\n" for w in want]
    assert max(len(w.split()) for w in want) <= 5  # --max_length counts the start token
    assert not list(images.rglob("*.caption"))


# (GIT's caption, after kohya's --remove_words); kohya's own patterns give the same text up to the spaces its cuts
# leave (checked once against its PATTERN_REPLACE; ours tidies them). One rule or more per case.
REMOVALS = [
    ('a man wearing a shirt with the words "hello world" on the front', "a man wearing a shirt"),
    ("a book cover that has the name bob in red letters", "a book cover that letters"),
    ("a poster and the letter a", "a poster"),
    ('a stop sign with a sign that says "stop" on it', "a stop sign"),
    ("a red sign that says stop", "a red sign"),
    ("a mug that says 'i'm the boss' on it", "a mug"),  # single quotes, "i'm" inside
    ("a jersey with the number 23 on the back", "a jersey"),
    ('a sign with the words "open', "a sign open"),  # an unclosed quote: only the phrase and the quote go
    ("a sign reading the word go on it", "a sign reading the"),
    ("a sign that says the word go on it", "a sign"),  # "that says the", then "word go on it"
    ("a shirt that says'the word \"", "a shirt"),
    ('a sign that says "a" and a sign that says "b"', "a sign and a sign"),  # every occurrence
    ("a dog with the red ball sitting on a table", "a dog with the red ball sitting on a table"),  # kept
]


@pytest.mark.parametrize("caption, want", REMOVALS)
def test_remove_words_rules(caption, want):
    assert git.remove_text_phrases(caption) == want


def test_remove_words_flag(git_dir, images, monkeypatch, caplog):
    """--remove_words applies the rules to the model's captions (here stood in by fixed ones); without it the
    captions are written as GIT gives them (kohya's default)."""
    caplog.set_level(logging.INFO)
    fixed = ['a sign that says "stop" on it', "a cat sitting on a table", "a shirt with the word hi on it"]
    monkeypatch.setattr(git, "caption_batch", lambda model, processor, batch, max_length: fixed[:len(batch)])
    paths = sorted(images.glob("*.png"))
    assert main([str(images), "--model_id", str(git_dir), "--batch_size", "3"]) == 0
    assert [p.with_suffix(".caption").read_text() for p in paths] == [f + "\n" for f in fixed]
    assert main([str(images), "--model_id", str(git_dir), "--batch_size", "3", "--remove_words", "--debug"]) == 0
    assert [p.with_suffix(".caption").read_text() for p in paths] == ["a sign\n", fixed[1] + "\n", "a shirt\n"]
    assert "--remove_words: 'a sign that says" in caplog.text


def test_bad_input_is_named_and_nothing_written(git_dir, images, tmp_path, capsys):
    def error(*argv) -> str:
        assert main([*map(str, argv)]) == 1
        assert not [p for p in images.rglob("*") if p.suffix in (".caption", ".txt")]
        return capsys.readouterr().err

    assert "train_data_dir" in error(tmp_path / "missing", "--model_id", git_dir)
    assert "no such folder" in error(tmp_path / "missing", "--model_id", git_dir)
    message = error(images)  # kohya's default --model_id is a hub id
    assert "--model_id microsoft/git-large-textcaps: no such folder" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download microsoft/git-large-textcaps" in message
    assert "no config.json, so not a transformers model folder" in error(images, "--model_id", tmp_path)
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "config.json").write_text(json.dumps({"model_type": "blip"}))
    assert "a 'blip' model (config.json's model_type), this tool needs a 'git' one" in \
        error(images, "--model_id", tmp_path / "blip")
    (tmp_path / "no_weights").mkdir()  # the GIT folder without its weights file
    for file in git_dir.iterdir():
        if not file.name.endswith(".safetensors"):
            (tmp_path / "no_weights" / file.name).write_bytes(file.read_bytes())
    assert "cannot be loaded as a GIT captioning model" in error(images, "--model_id", tmp_path / "no_weights")
    assert "--max_length must be at least 2" in error(images, "--model_id", git_dir, "--max_length", "1")
    assert "--batch_size must be at least 1" in error(images, "--model_id", git_dir, "--batch_size", "0")
