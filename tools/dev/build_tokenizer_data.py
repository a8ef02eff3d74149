"""Build the CLIP BPE tokenizer files shipped in ``library/model_configs/tokenizer/``.

The SD 1.x (openai CLIP ViT-L/14), SD 2.x and SDXL (OpenCLIP ViT-H/14, ViT-bigG/14) text
encoders all use the same byte-level BPE: OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, which
open_clip ships as package data. This script turns that file into the ``vocab.json`` +
``merges.txt`` pair that ``transformers.CLIPTokenizer`` loads from a folder, so the
training code never needs the Hugging Face hub to get a tokenizer.

The vocabulary construction mirrors ``SimpleTokenizer.__init__`` in openai/CLIP and
open_clip, and the output format mirrors ``openai/clip-vit-large-patch14`` on the hub
(compact, non-ASCII-escaped JSON in id order; ``#version: 0.2`` header in merges.txt).

Usage (from the repository root)::

    python tools/dev/build_tokenizer_data.py            # rewrite the shipped files
    python tools/dev/build_tokenizer_data.py OUT_DIR    # write somewhere else

Only open_clip's *data file* is read: ``find_spec`` locates the package without
executing its ``__init__`` (which imports torch/timm/etc.).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT_DIR = REPO_ROOT / "library" / "model_configs" / "tokenizer"

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges of the file (same slice as openai/CLIP).
NUM_MERGES = 49152 - 256 - 2  # 48894
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
MERGES_HEADER = "#version: 0.2"


def find_open_clip_bpe() -> Path:
    """Path of open_clip's BPE merges file, without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; it is only needed to rebuild the tokenizer data")
    path = Path(spec.submodule_search_locations[0]) / BPE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char table (insertion order defines ids 0..255)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_merges(bpe_path: Path) -> list[str]:
    """Merge rules ("a b"), in rank order. Line 0 of the file is a header and is skipped."""
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 1 + NUM_MERGES]
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{bpe_path} does not look like the CLIP BPE file")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # A duplicate would silently shift ids; the real file has none.
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} unique tokens, got {len(vocab)} of {len(tokens)}")
    return vocab


def build(out_dir: Path | str = DEFAULT_OUT_DIR, bpe_path: Path | str | None = None) -> list[Path]:
    """Write vocab.json and merges.txt into ``out_dir``; returns the written paths."""
    out_dir = Path(out_dir)
    bpe_path = Path(bpe_path) if bpe_path is not None else find_open_clip_bpe()
    merges = read_merges(bpe_path)
    vocab = build_vocab(merges)

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = out_dir / "vocab.json"
    merges_path = out_dir / "merges.txt"
    # Same byte format as the hub's openai/clip-vit-large-patch14 vocab.json: one line, no
    # spaces, raw UTF-8, keys in id order, no trailing newline. Written as bytes so the
    # platform's newline translation cannot change the output.
    vocab_path.write_bytes(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    merges_path.write_bytes(("\n".join([MERGES_HEADER, *merges]) + "\n").encode("utf-8"))
    return [vocab_path, merges_path]


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[0]) if argv else DEFAULT_OUT_DIR
    for path in build(out_dir):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
