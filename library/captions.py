"""Captions: reading caption files, the per-sample caption pipeline, tag statistics and A1111 prompt weights.

The pipeline keeps kohya-ss/sd-scripts' user contract (`--shuffle_caption`, `--keep_tokens`, `--caption_dropout_*`,
`--enable_wildcard`, ...), in kohya's order, as one pure function: every random choice comes from the
`random.Random` the caller passes, seeded from (seed, epoch, item index), so a resumed run sees the same captions
as an uninterrupted one. Where this module departs from kohya, the docstring or comment says so and why.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BREAK = "BREAK"  # text of the A1111 chunk-break marker segment, returned with weight BREAK_WEIGHT
BREAK_WEIGHT = -1.0


class CaptionFileError(ValueError):
    """A caption file exists but cannot be used (empty, or not UTF-8)."""


@dataclass(frozen=True)
class CaptionOptions:
    """Caption options of one subset; field names and defaults are kohya's flags (`--shuffle_caption`, ...).

    An empty string for a separator, prefix or suffix means "off", as in kohya (its code tests truthiness).
    """

    shuffle_caption: bool = False
    keep_tokens: int = 0  # number of leading *tags* (not CLIP tokens) kept in place
    keep_tokens_separator: str = ""  # e.g. "|||": tags before it are fixed; after a second one, a fixed suffix
    caption_separator: str = ","
    secondary_separator: str | None = None  # glues sub-tags into one unit; becomes caption_separator at the end
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0  # < 1: fraction of max_train_steps; >= 1: a step count

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the kohya flag of the first bad value."""
        for flag in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            value = getattr(self, flag)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{flag} must be in [0, 1], got {value}")
        for flag in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min"):
            value = getattr(self, flag)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{flag} must be a non-negative integer, got {value!r}")
        step = self.token_warmup_step
        if not math.isfinite(step) or step < 0:
            raise ValueError(f"--token_warmup_step must be >= 0, got {step}")
        if step >= 1 and step != int(step):
            # kohya would divide by e.g. 150.5; a fractional step count is certainly a typo.
            raise ValueError(f"--token_warmup_step >= 1 is a step count and must be whole, got {step} "
                             "(use a value below 1 for a fraction of max_train_steps)")
        if not self.caption_separator:
            raise ValueError("--caption_separator must not be empty")

    def resolved_warmup_step(self, max_train_steps: int) -> int:
        """The step at which token warmup ends: `token_warmup_step` steps, or that fraction of max_train_steps."""
        if self.token_warmup_step < 1:
            return math.floor(self.token_warmup_step * max_train_steps)
        return int(self.token_warmup_step)


def per_step_caption_options(opts: CaptionOptions, max_train_steps: int) -> list[str]:
    """The flags set in `opts` that make a caption differ from step to step (random order, dropout, warmup, a random
    line or wildcard choice), by kohya's names: what cached text-encoder outputs cannot follow."""
    changing = {"--shuffle_caption": opts.shuffle_caption, "--caption_dropout_rate": opts.caption_dropout_rate > 0,
                "--caption_dropout_every_n_epochs": opts.caption_dropout_every_n_epochs > 0,
                "--caption_tag_dropout_rate": opts.caption_tag_dropout_rate > 0,
                "--token_warmup_step": opts.resolved_warmup_step(max_train_steps) > 0,
                "--enable_wildcard": opts.enable_wildcard}
    return [flag for flag, on in changing.items() if on]


def caption_joiner(separator: str) -> str:
    """The string tags are re-joined with after shuffle / dropout / warmup.

    Rule: the separator itself if it already ends in whitespace (" | " stays " | ", " " stays " "), otherwise the
    separator plus one space ("," -> ", ", "|" -> "| "). For the default "," this is kohya's hard-coded ", ";
    kohya at the pinned commit joins with ", " for *every* separator, losing a custom one (issue #1304).
    Its later fix (PR #2390) joins with separator + " ", which equals this rule except that we do not double
    the space of a separator that already ends in one.
    """
    return separator if separator[-1].isspace() else separator + " "


def process_caption(raw: str, opts: CaptionOptions, *, rng: random.Random, epoch: int, step: int,
                    max_train_steps: int) -> str:
    """The caption one sample trains with, from the caption text as read (possibly several lines).

    `epoch` counts from 1, as kohya's trainers do (`current_epoch.value = epoch + 1`), so with
    `caption_dropout_every_n_epochs=n` epochs n, 2n, ... train with empty captions. `step` is the number of
    optimizer steps done so far (0 for the first batch), as kohya's `current_step.value = global_step`.

    Order (kohya `BaseDataset.process_caption`):
    1. dropout: `rng.random() < caption_dropout_rate` (drawn only when the rate is > 0), or every n-th epoch
       -> "" and nothing else happens;
    2. one line: the first non-empty line, or with enable_wildcard a random non-empty line;
    3. prefix / suffix joined with one space (so they merge into the first / last tag unless they end / start
       with the separator: a prefix "sks" becomes part of the first tag and counts for keep_tokens);
    4. with enable_wildcard, each `{a|b|c}` becomes one random choice; `{{` and `}}` are literal braces;
    5. if shuffle, token warmup, tag dropout or a keep_tokens_separator in the text: split on the separator into
       fixed head (first keep_tokens tags, or everything before keep_tokens_separator), flexible tags and fixed
       tail (after a second keep_tokens_separator); warmup keeps the first floor(step*(n-min)/warmup)+min
       flexible tags while step < warmup; shuffle; drop each flexible tag with caption_tag_dropout_rate; re-join
       with `caption_joiner(caption_separator)`;
    6. secondary_separator -> caption_separator (verbatim, no added space, as kohya).
    """
    if epoch < 1:
        raise ValueError(f"epoch counts from 1 (kohya's numbering), got {epoch}")
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    n = opts.caption_dropout_every_n_epochs
    if dropped or (n > 0 and epoch % n == 0):
        return ""

    # kohya adds prefix/suffix to the whole multi-line text, so only the first line got the prefix and only the
    # last the suffix; picking the line first gives every line both, which is what the flags promise.
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if not lines:
        text = ""
    elif opts.enable_wildcard and len(lines) > 1:
        text = rng.choice(lines)
    else:
        # kohya takes the literal first line (a leading blank line silently gives an empty caption).
        text = lines[0]
    # kohya writes prefix + " " + caption even for an empty caption; skipping empty parts avoids a stray space.
    text = " ".join(part for part in (opts.caption_prefix, text, opts.caption_suffix) if part)

    if opts.enable_wildcard:
        text = expand_wildcards(text, rng)

    warmup = opts.resolved_warmup_step(max_train_steps)
    kts = opts.keep_tokens_separator
    # kohya tests the unresolved token_warmup_step > 0 here (and overwrites it after the first sample), so a
    # fraction that floors to 0 steps changed behaviour after one sample; we test the resolved step.
    # A keep_tokens_separator in the text is always removed: kohya would feed a literal "|||" to the text encoder
    # when none of shuffle / warmup / tag dropout is on.
    if opts.shuffle_caption or warmup > 0 or opts.caption_tag_dropout_rate > 0 or (kts and kts in text):
        head, flex, tail = _split_tags(text, opts)
        if warmup > 0 and step < warmup:
            # Exact integer floor; kohya computes floor(step * ((n - min) / warmup)) in floating point, which is
            # one tag short at exact multiples such as step=11, n-min=30, warmup=22 (15 exactly, float gives 14).
            count = (step * (len(flex) - opts.token_warmup_min)) // warmup + opts.token_warmup_min
            flex = flex[:max(count, 0)]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [tag for tag in flex if rng.random() >= opts.caption_tag_dropout_rate]
        text = caption_joiner(opts.caption_separator).join(head + flex + tail)

    if opts.secondary_separator:
        text = text.replace(opts.secondary_separator, opts.caption_separator)
    return text


def _split_tags(text: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible tags, fixed tail), each tag stripped, empty tags dropped.

    kohya keeps empty tags in the keep_tokens path (so "a,,b" or a trailing separator yields an empty tag that
    shuffles into the middle as "a, , b" and counts towards keep_tokens); we drop them everywhere.
    """
    def tags(part: str) -> list[str]:
        return [t.strip() for t in part.split(opts.caption_separator) if t.strip()]

    kts = opts.keep_tokens_separator
    if kts and kts in text:
        # At most two splits, as kohya: a third separator stays inside the tail text.
        parts = text.split(kts, 2)
        return tags(parts[0]), tags(parts[1]), tags(parts[2]) if len(parts) == 3 else []
    all_tags = tags(text)
    return all_tags[:opts.keep_tokens], all_tags[opts.keep_tokens:], []


_WILDCARD = re.compile(r"\{([^}]+)\}")


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace each `{a|b|c}` with one random option; `{{` / `}}` are literal `{` / `}` (kohya's rules).

    Like kohya, the escapes are taken out before groups are matched (so `}}` never closes a group) and an option
    may be empty (`{a|}`). Placeholders are private-use characters not present in the text.
    """
    open_mark, close_mark = "\ue000", "\ue001"
    while open_mark in text or close_mark in text:
        open_mark, close_mark = open_mark + "\ue000", close_mark + "\ue001"
    text = text.replace("{{", open_mark).replace("}}", close_mark)
    text = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    return text.replace(open_mark, "{").replace(close_mark, "}")


def caption_path_for(image_path: Path, caption_extension: str) -> Path:
    """`<image path without its extension><caption_extension>`; a missing leading dot is added (as kohya).

    kohya also tries the stem minus its last four `_` fields (face-crop file names) when the stem has five or
    more; that silent fallback is the caller's decision, not done here.
    """
    if not caption_extension:
        raise ValueError("--caption_extension must not be empty (e.g. '.txt' or '.caption')")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + caption_extension)


# The extensions caption files have in the tools users run: kohya's trainers default to .caption, the WD14 /
# DeepDanbooru taggers write .txt, some taggers .tags. Used to name the right --caption_extension when the one given
# matches nothing.
CAPTION_EXTENSIONS = (".caption", ".txt", ".tags")


def other_caption_files(images: Iterable[Path], caption_extension: str) -> dict[str, int]:
    """For each known caption extension other than `caption_extension`: how many of `images` have a same-stem
    file with it (extensions with none left out)."""
    images = list(images)
    given = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    counts = {ext: sum(caption_path_for(p, ext).is_file() for p in images) for ext in CAPTION_EXTENSIONS
              if ext != given.lower()}
    return {ext: n for ext, n in counts.items() if n}


def read_caption_file(path: Path) -> str | None:
    """The caption text of a file (all lines, UTF-8 BOM removed), or None when there is no such file.

    Raises CaptionFileError for a file that is not UTF-8 (kohya crashes with a bare UnicodeDecodeError) or holds
    only whitespace (kohya asserts on a 0-byte file but silently trains a whitespace-only one with "").
    kohya reads with "utf-8", so a BOM written by Notepad became part of the first tag; we remove it.
    """
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CaptionFileError(
            f"caption file {path} is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "re-save it with UTF-8 encoding") from None
    if not text.strip():
        raise CaptionFileError(
            f"caption file {path} is empty; write a caption into it, or delete it to train that image "
            "without one (DreamBooth folders then use the class tokens)")
    return text


def tag_frequency(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """Tag -> count over the captions, as kohya's `ss_tag_frequency` (tags stripped, lower-cased, empty skipped).

    kohya always splits on "," whatever --caption_separator is; pass that separator here to count custom tags.
    Line breaks also end a tag here (kohya counted "b\\nc" of a multi-line wildcard caption as one tag).
    """
    counts: dict[str, int] = {}
    for caption in captions:
        for line in caption.splitlines():
            for tag in line.split(separator):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return counts


# A1111 attention tokens, in priority order: escapes, a lone backslash (dropped), brackets, a ":weight)" closer,
# plain text, a lone ":". The weight is a strict number so "(a:1.2.3)" is text instead of A1111's float() crash.
_ATTENTION = re.compile(r"""
    \\[()\[\]\\]                                           # \( \) \[ \] \\ : the literal character
  | \\                                                     # any other backslash: dropped (A1111 does the same)
  | [(\[]
  | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)      # "(text:1.5)" closer, spaces allowed as in A1111
  | [)\]]
  | [^\\()\[\]:]+
  | :
""", re.X)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """(text, weight) segments of a prompt in AUTOMATIC1111's attention syntax (`parse_prompt_attention`).

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:w)` multiplies by w; they nest; unclosed brackets apply to
    the end of the prompt; a closer without an opener is literal text; `\\(` `\\)` `\\[` `\\]` `\\\\` are literal.
    `BREAK` (a whole word) becomes the marker segment ("BREAK", -1.0). Runs of equal weight are merged, and the
    weights are multiplied in A1111's order so they are bit-identical to its output.
    Deliberate differences: a BREAK inside brackets stays the marker (A1111 multiplies its -1 by the bracket
    weight, after which it is no longer recognised and "BREAK" is encoded as a word with a negative weight);
    markers never merge; a malformed weight such as ":1.2.3)" is plain text instead of an exception.
    """
    segments: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for segment in segments[start:]:
            if not segment[2]:
                segment[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            segments.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(segments))
        elif token == "[":
            square_open.append(len(segments))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(token)):
                if i > 0:
                    segments.append([BREAK, BREAK_WEIGHT, True])
                segments.append([part, 1.0, False])
    for start in round_open:
        multiply_from(start, 1.1)
    for start in square_open:
        multiply_from(start, 1 / 1.1)

    merged: list[list] = []
    for segment in segments or [["", 1.0, False]]:
        if merged and not segment[2] and not merged[-1][2] and merged[-1][1] == segment[1]:
            merged[-1][0] += segment[0]
        else:
            merged.append(segment)
    return [(segment_text, weight) for segment_text, weight, _ in merged]
