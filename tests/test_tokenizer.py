"""Tests for library/tokenizer.py and the shipped CLIP tokenizer data.

Expected ids come from two sources that do not go through the code under test:
hard-coded values known from openai CLIP / open_clip output, and a small re-implementation
of openai CLIP's ``SimpleTokenizer`` below that reads open_clip's original BPE file.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
from pathlib import Path

import pytest
import regex
from transformers import CLIPTokenizer

from library.tokenizer import TOKENIZER_DATA_DIR, PadStyle, load_clip_tokenizer, save_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "tools" / "dev" / "build_tokenizer_data.py"
BOS, EOS = 49406, 49407
PAD_ID = {PadStyle.EOS: EOS, PadStyle.ZERO: 0}

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, 1girl, solo, (blue eyes:1.2), [red hair], {smile}",
    "an astronaut riding a horse on mars, 8k, trending on artstation!!!",
    "don't you're it's we've I'm they'll he'd",
    "hello!! world?! ... -- ## @user #tag $100 50% a+b=c <lora:abc:0.7>",
    "café naïve résumé Zürich Ελληνικά русский 日本語のテキスト 한국어",
    "emoji 🐱🚀🔥 👍🏽 👨‍👩‍👧",
    "tabs\tand\nnewlines   and   spaces",
    "  leading and trailing  ",
    "",
    "numbers 1234567890 3.14159 1e-5",
    "a very long prompt " + "with many repeated words " * 40,
]


@functools.lru_cache(maxsize=None)
def _tokenizer(style: PadStyle) -> CLIPTokenizer:
    # Loading is cheap (~50 ms), but share instances anyway; tests must not mutate them.
    return load_clip_tokenizer(style)


def _open_clip_bpe() -> Path | None:
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_tokenizer_data", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ReferenceClipTokenizer:
    """openai/CLIP ``SimpleTokenizer`` (the algorithm SD's text encoders were trained with).

    ``specials_in_text``: openai's version maps a literal "<|endoftext|>" in the prompt to
    its id; open_clip's (SD 2.x / SDXL) has no in-text special tokens.
    """

    def __init__(self, bpe_path: Path, specials_in_text: bool):
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        self.byte_encoder = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        specials = r"<\|startoftext\|>|<\|endoftext\|>|" if specials_in_text else ""
        self.pat = regex.compile(specials + r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token: str) -> list[str]:
        if token in ("<|startoftext|>", "<|endoftext|>"):
            return [token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        ftfy = pytest.importorskip("ftfy")
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = " ".join(text.split()).strip().lower()
        ids = [BOS]
        for piece in self.pat.findall(text):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece))
        return ids + [EOS]


@pytest.fixture(scope="module")
def bpe_path() -> Path:
    path = _open_clip_bpe()
    if path is None:
        pytest.skip("open_clip's bpe_simple_vocab_16e6.txt.gz is not installed")
    return path


def test_shipped_folder_layout():
    assert sorted(p.name for p in TOKENIZER_DATA_DIR.iterdir()) == ["merges.txt", "vocab.json"]
    vocab = json.loads((TOKENIZER_DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    merges = (TOKENIZER_DATA_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2"
    assert merges[1:3] == ["i n", "t h"] and merges[-2:] == ["jeky ll</w>", ""]
    assert len(merges) == 1 + 48894 + 1


@pytest.mark.parametrize("style", list(PadStyle))
def test_special_tokens_and_sizes(style):
    tok = _tokenizer(style)
    assert type(tok) is CLIPTokenizer
    assert tok.vocab_size == len(tok) == 49408
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", BOS)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", EOS)
    assert (tok.unk_token, tok.unk_token_id) == ("<|endoftext|>", EOS)
    assert tok.pad_token == {PadStyle.EOS: "<|endoftext|>", PadStyle.ZERO: "!"}[style]
    assert tok.pad_token_id == PAD_ID[style]
    assert tok.model_max_length == 77
    assert load_clip_tokenizer(style, model_max_length=225).model_max_length == 225


@pytest.mark.parametrize("style", list(PadStyle))
def test_golden_ids(style):
    tok = _tokenizer(style)
    # Well-known CLIP ids (openai CLIP / open_clip output).
    assert tok("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert tok("a photo of a dog").input_ids == [BOS, 320, 1125, 539, 320, 1929, EOS]
    assert tok("the cat and the dog, .").input_ids == [BOS, 518, 2368, 537, 518, 1929, 267, 269, EOS]
    # open_clip.tokenize("! !! !!!") as quoted in diffusers issue #4153.
    assert tok("! !! !!!").input_ids == [BOS, 256, 748, 995, EOS]
    assert tok("").input_ids == [BOS, EOS]


def test_literal_special_token_text():
    # openai CLIP (SD 1.x) maps a typed "<|endoftext|>" to its id; open_clip (SD 2.x) doesn't.
    assert _tokenizer(PadStyle.EOS)("a <|endoftext|>").input_ids == [BOS, 320, EOS, EOS]
    zero_ids = _tokenizer(PadStyle.ZERO)("a <|endoftext|>").input_ids
    assert zero_ids[:2] == [BOS, 320] and zero_ids[-1] == EOS and EOS not in zero_ids[1:-1]


@pytest.mark.parametrize("style", list(PadStyle))
def test_matches_reference_implementation(style, bpe_path):
    ref = ReferenceClipTokenizer(bpe_path, specials_in_text=style is PadStyle.EOS)
    tok = _tokenizer(style)
    for prompt in PROMPTS + ["<|startoftext|>x<|endoftext|>"]:
        assert tok(prompt).input_ids == ref.encode(prompt), prompt


@pytest.mark.parametrize("style", list(PadStyle))
def test_padding(style):
    ids = _tokenizer(style)("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[:7] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert ids[7:] == [PAD_ID[style]] * 70


@pytest.mark.parametrize("style", list(PadStyle))
def test_truncation_keeps_eos_last(style):
    tok = _tokenizer(style)
    long_prompt = "a photo of a cat " * 40
    full = tok(long_prompt).input_ids
    assert len(full) > 77
    ids = tok(long_prompt, padding="max_length", truncation=True, max_length=tok.model_max_length).input_ids
    assert len(ids) == 77
    assert ids == full[:76] + [EOS]


@pytest.mark.parametrize("style", list(PadStyle))
def test_save_round_trip(style, tmp_path):
    tok = _tokenizer(style)
    written = save_tokenizer(tok, tmp_path / "tokenizer")
    assert sorted(p.name for p in written) == sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "tokenizer" / name).read_bytes() == (TOKENIZER_DATA_DIR / name).read_bytes()

    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer", local_files_only=True)
    assert (loaded.pad_token, loaded.pad_token_id) == (tok.pad_token, tok.pad_token_id)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.model_max_length) == (BOS, EOS, 77)
    prompts = PROMPTS + ["! !! !!!", "a <|endoftext|> b"]
    assert loaded(prompts).input_ids == tok(prompts).input_ids
    kwargs = dict(padding="max_length", truncation=True, max_length=77)
    assert loaded(prompts, **kwargs).input_ids == tok(prompts, **kwargs).input_ids


def test_save_round_trip_keeps_added_tokens(tmp_path):
    tok = load_clip_tokenizer(PadStyle.ZERO)  # a fresh one: add_tokens mutates it
    tok.add_tokens(["<cat-toy>"])
    save_tokenizer(tok, tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(loaded) == 49409
    assert loaded("a <cat-toy>!").input_ids == tok("a <cat-toy>!").input_ids == [BOS, 320, 49408, 256, EOS]


def test_build_script_is_reproducible(tmp_path, bpe_path):
    build = _load_build_script()
    written = build.build(tmp_path, bpe_path=bpe_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    for path in written:
        assert path.read_bytes() == (TOKENIZER_DATA_DIR / path.name).read_bytes(), path.name
