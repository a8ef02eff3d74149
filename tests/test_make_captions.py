"""finetune/make_captions.py on a tiny random-weight BLIP (transformers' BlipForConditionalGeneration, built from a
config and saved with its processor): one caption file per image holding exactly what BLIP's generate() gives for
kohya's prompt and decoding settings (greedy / beam search, and seeded nucleus sampling), with the prompt cut;
the model folder rules (nothing downloaded; kohya's URL and .pth refused with what to do).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from finetune.make_captions import main

WORDS = ["a", "picture", "of", "cat", "dog", "red", "blue", "green", "on", "the", "table", "sitting", "with", "small",
         "large", "bird", "tree", "##s", "in", "sky"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder = tmp_path_factory.mktemp("blip")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "[DEC]"])}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 16, "width": 16}),
                              tokenizer=tokenizer)
    text = dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=40, bos_token_id=vocab["[DEC]"],
                sep_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"], eos_token_id=vocab["[SEP]"])
    # BLIP's vision init is 1e-10 (features ~1e-7): a wider one, so that images matter to the captions
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
                  patch_size=8, initializer_range=0.5)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():  # sharper logits and more weight on the image than the init's: captions differ per image
        model.text_decoder.cls.predictions.decoder.weight.mul_(30)
        model.text_decoder.bert.encoder.layer[0].crossattention.output.dense.weight.mul_(50)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def expected(blip_dir, paths, generate_kwargs, seed=None) -> list[str]:
    """BLIP's own generate() on the images with kohya's prompt, decoded, prompt removed."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(blip_dir)
    model = BlipForConditionalGeneration.from_pretrained(blip_dir).eval()
    if seed is not None:
        torch.manual_seed(seed)
    inputs = processor(images=[Image.open(p).convert("RGB") for p in paths], text=["a picture of "] * len(paths),
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], **generate_kwargs)
    texts = processor.batch_decode(out, skip_special_tokens=True)
    assert all(t.startswith("a picture of") for t in texts)
    return [t[len("a picture of "):] for t in texts]


def test_greedy_captions(blip_dir, images):
    assert main([str(images), "--model_dir", str(blip_dir), "--beam_search", "--batch_size", "2",
                 "--max_length", "12", "--min_length", "8"]) == 0
    paths = sorted(images.glob("*.png"))
    want = expected(blip_dir, paths[:2], {"num_beams": 1, "max_length": 12, "min_length": 8}) + \
        expected(blip_dir, paths[2:], {"num_beams": 1, "max_length": 12, "min_length": 8})
    got = [p.with_suffix(".caption").read_bytes() for p in paths]
    assert got == [(w + "\n").encode() for w in want]
    assert all(len(w.split()) >= 3 for w in want) and len(set(want)) > 1  # real, differing captions
    assert not (images / "sub" / "deep.caption").exists()  # not without --recursive


def test_beams_sampling_recursive_and_extension(blip_dir, images):
    argv = [str(images), "--caption_weights", str(blip_dir), "--recursive", "--caption_extension", ".txt",
            "--max_length", "10", "--min_length", "6", "--max_data_loader_n_workers", "1"]
    assert main(argv + ["--beam_search", "--num_beams", "3"]) == 0
    paths = sorted(images.rglob("*.png")) + sorted(images.rglob("*.jpg"))
    paths = sorted(paths)
    beam = expected(blip_dir, paths[:1], {"num_beams": 3, "max_length": 10, "min_length": 6})
    assert (images / "img0.txt").read_text() == beam[0] + "\n"
    assert (images / "sub" / "deep.txt").is_file()

    # nucleus sampling from the global generator seeded once with --seed: batch 4 = all images in one call
    assert main(argv + ["--batch_size", "4", "--seed", "7", "--top_p", "0.8"]) == 0
    want = expected(blip_dir, paths, {"do_sample": True, "top_p": 0.8, "max_length": 10, "min_length": 6,
                                      "repetition_penalty": 1.1}, seed=7)
    assert [p.with_suffix(".txt").read_text() for p in paths] == [w + "\n" for w in want]
    other_seed = expected(blip_dir, paths, {"do_sample": True, "top_p": 0.8, "max_length": 10, "min_length": 6,
                                            "repetition_penalty": 1.1}, seed=8)
    assert other_seed != want  # the seed matters, so the comparison above is not vacuous


def test_model_location_errors(tmp_path, images, capsys):
    def error(*argv) -> str:
        assert main([str(images), *map(str, argv)]) == 1
        return capsys.readouterr().err

    message = error()  # kohya's default --caption_weights is a URL
    assert "nothing is downloaded here" in message and "Salesforce/blip-image-captioning-large" in message
    (tmp_path / "model_large_caption.pth").write_bytes(b"x")
    assert "kohya's original BLIP checkpoint" in error("--caption_weights", tmp_path / "model_large_caption.pth")
    assert "no such folder" in error("--model_dir", tmp_path / "missing")
    assert "no config.json" in error("--model_dir", tmp_path)
    assert "--top_p must be in (0, 1]" in error("--model_dir", tmp_path, "--top_p", "0")


def test_unreadable_image_is_named(blip_dir, images, capsys):
    (images / "broken.png").write_bytes(b"not an image")
    assert main([str(images), "--model_dir", str(blip_dir), "--beam_search", "--max_length", "8"]) == 1
    err = capsys.readouterr().err
    assert "1 image(s) were not captioned" in err and "broken.png" in err
    assert (images / "img0.caption").is_file() and not (images / "broken.caption").exists()
