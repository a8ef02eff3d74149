"""The clean-up `finetune/clean_captions_and_tags.py` applies to a fine-tune metadata file: kohya's heuristics for
BLIP captions of anime pictures and Danbooru-style tags (WD14 / DeepDanbooru taggers), as rule tables.

Tags (`clean_tags`), in this order:
1. "_" becomes " " (Danbooru writes "long_hair", prompts say "long hair"), except in kaomoji tags such as "^_^";
2. DeepDanbooru's rating tags ("rating:safe") are removed;
3. in a picture of several people ("2girls", "multiple boys"), a per-person attribute given with two or more values
   (blue eyes + red eyes) is removed: the values cannot be tied to one person;
4. a bare tag that a more specific tag repeats ("shirt" beside "white shirt") is removed.
Captions (`clean_caption`): ordered replacements that turn "a cartoon woman" into "a girl" and the like, each
applied until it no longer occurs.

Differs from kohya (fixes for inputs kohya mangles; ordinary tagger / BLIP output cleans exactly as in kohya):
- tags are split on "," with or without a following space and re-joined with ", " (kohya only knew ", ");
- a rating tag is removed wherever it stands; kohya cut the list at the first ", rating" (dropping every tag after
  it) and kept a rating tag that came first;
- every Danbooru kaomoji keeps its "_" (kohya kept only "^_^": ">_<" became "> <");
- caption rules match whole words, optionally followed by a plural "s" ("females" -> "girls" as in kohya); kohya
  replaced any substring ("ladybug" -> "girlbug", "personal" -> "girlal", "superwoman" -> "supergirl").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Danbooru's kaomoji tags, whose underscore is part of the face (the list kohya's WD14 tagger keeps for
# --remove_underscore).
KAOMOJI_TAGS = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
                          ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})

# DeepDanbooru adds "rating:safe" / "rating:questionable" / "rating:explicit": a content rating, not something
# the picture shows.
RATING_PREFIX = "rating:"

# A tag containing one of these marks a picture of several people ("2girls", "multiple boys", "6+girls").
MULTI_PERSON_MARKERS = ("girls", "boys")

# Per-person attribute groups (a tag belongs to a group when the pattern matches the whole tag). With several
# people, two tags of one group describe different people, and a caption cannot say whose is whose.
PER_PERSON_GROUPS = (
    ("hair length", r"(long|short|medium) hair"),  # only these three; "very long hair" is left alone (kohya)
    ("haircut", r"(bob|hime) cut"),
    ("eyes", r"[\w\-]+ eyes"),  # eye colours, but also "closed eyes": kohya's pattern
    ("sleeves", r"[\w\-]+ sleeves|sleeveless"),
    ("hairstyle", r"ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up"
                  r"|two tails|[\w\-]+ braid|sidelocks"),
    # one-word "<x> hair" tags (colours, "wavy hair", ...) other than a hair length, which the group above owns
    ("hair", r"(?!(long|short|medium) hair$)[\w\-]+ hair"),
)

# Bare tags that a more specific tag can repeat: one-word tags ("shirt" in "white shirt") and these.
GENERIC_MULTIWORD_TAGS = ("hair ornament",)
# The specific form: one or more plain words, a space, then the bare tag ("red hair ornament"). As in kohya, words
# with a hyphen ("off-shoulder shirt") do not count as a more specific form.
_SPECIFIC_PREFIX = r"(?:\w+ )+"

# (text, replacement), applied in this order, each until it no longer occurs. BLIP describes anime pictures in
# words that do not suit the prompts the model will be used with; kohya settles on "girl" for a person.
CAPTION_RULES = (
    ("anime anime", "anime"),  # BLIP sometimes repeats the style word
    ("young ", ""),  # "a young girl": age words add nothing to an anime caption
    ("anime girl", "girl"),  # the style words go: the whole dataset has that style
    ("cartoon female", "girl"),  # "cartoon" + a person: the same
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),  # also "cartoon characters" -> "girls"
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),  # "anime" + a person: the same
    ("anime lady", "girl"),
    ("anime character", "girl"),  # also "anime characters" -> "girls"
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),  # any other word for a woman or a person becomes "girl"
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),  # "a cartoon <picture word>": the style word goes
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),  # what the replacements above can leave behind ("anime girl girl")
)


def _whole_words(text: str) -> re.Pattern:
    # Word boundaries only where the text itself starts / ends with a word character ("young " ends in a space);
    # a plural "s" may follow and is kept ("females" -> "girls").
    start = r"(?<!\w)" if re.match(r"\w", text) else ""
    end = r"(?=s?(?!\w))" if re.match(r"\w", text[-1]) else ""
    return re.compile(start + re.escape(text) + end)


_PER_PERSON = tuple((name, re.compile(pattern)) for name, pattern in PER_PERSON_GROUPS)
_ONE_WORD = re.compile(r"[\w\-]+")
_CAPTION_PATTERNS = tuple((_whole_words(text), replacement) for text, replacement in CAPTION_RULES)


def split_tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def clean_tags(text: str) -> str:
    tags = [tag if tag in KAOMOJI_TAGS else tag.replace("_", " ") for tag in split_tags(text)]
    tags = [tag for tag in tags if not tag.startswith(RATING_PREFIX)]
    if any(marker in tag for tag in tags for marker in MULTI_PERSON_MARKERS):
        for _, pattern in _PER_PERSON:
            if sum(1 for tag in tags if pattern.fullmatch(tag)) > 1:
                tags = [tag for tag in tags if not pattern.fullmatch(tag)]
    for bare in [tag for tag in tags if _ONE_WORD.fullmatch(tag) or tag in GENERIC_MULTIWORD_TAGS]:
        specific = re.compile(_SPECIFIC_PREFIX + re.escape(bare))
        if any(specific.fullmatch(tag) for tag in tags):
            tags = [tag for tag in tags if tag != bare]
    return ", ".join(tags)


def clean_caption(caption: str) -> str:
    # Each loop ends: no replacement contains the text it replaces, and "girl girl" -> "girl" shortens the caption.
    for pattern, replacement in _CAPTION_PATTERNS:
        while True:
            cleaned = pattern.sub(lambda _: replacement, caption)
            if cleaned == caption:
                break
            caption = cleaned
    return caption


@dataclass(frozen=True)
class CleanupReport:
    metadata: dict[str, dict]  # a new dict; the input is not modified
    changes: list[tuple[str, str, str, str]]  # (key, field, before, after) for every value that changed
    without_tags: list[str]  # keys
    without_caption: list[str]


def clean_metadata(metadata: dict[str, dict], *, progress: bool = True) -> CleanupReport:
    """Clean every entry's "tags" and "caption"; all other fields are kept as they are."""
    from tqdm import tqdm

    out, changes, without = {}, [], {"tags": [], "caption": []}
    for key, entry in tqdm(metadata.items(), desc="cleaning", unit="entry", disable=not progress):
        entry = dict(entry)
        for field, clean in (("tags", clean_tags), ("caption", clean_caption)):
            value = entry.get(field)
            if value is None:
                without[field].append(key)
                continue
            if not isinstance(value, str):
                raise ValueError(f"entry {key!r}: \"{field}\" must be a string, got {type(value).__name__}")
            entry[field] = clean(value)
            if entry[field] != value:
                changes.append((key, field, value, entry[field]))
        out[key] = entry
    return CleanupReport(out, changes, without["tags"], without["caption"])
