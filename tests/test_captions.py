"""Caption pipeline, caption files, tag frequency and A1111 prompt weights (all CPU, well under a second)."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path

import pytest

from library.captions import (
    BREAK,
    CaptionFileError,
    CaptionOptions,
    caption_joiner,
    caption_path_for,
    expand_wildcards,
    parse_prompt_weights,
    process_caption,
    read_caption_file,
    tag_frequency,
)

TAGS = "a, b, c, d, e, f, g, h"


def run(raw, seed=0, epoch=1, step=0, max_train_steps=1000, **options):
    return process_caption(raw, CaptionOptions(**options), rng=random.Random(seed), epoch=epoch, step=step,
                           max_train_steps=max_train_steps)


def split(caption, sep=","):
    return [t.strip() for t in caption.split(sep)]


# ---------------------------------------------------------------------------------------------- options


def test_defaults_are_kohyas():
    o = CaptionOptions()
    assert (o.shuffle_caption, o.keep_tokens, o.keep_tokens_separator, o.caption_separator) == (False, 0, "", ",")
    assert (o.secondary_separator, o.enable_wildcard, o.caption_prefix, o.caption_suffix) == (None, False, None, None)
    assert (o.caption_dropout_rate, o.caption_dropout_every_n_epochs, o.caption_tag_dropout_rate) == (0.0, 0, 0.0)
    assert (o.token_warmup_min, o.token_warmup_step) == (1, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.keep_tokens = 3


@pytest.mark.parametrize("field, value, flag", [
    ("caption_dropout_rate", 1.5, "--caption_dropout_rate"),
    ("caption_dropout_rate", -0.1, "--caption_dropout_rate"),
    ("caption_tag_dropout_rate", 2.0, "--caption_tag_dropout_rate"),
    ("keep_tokens", -1, "--keep_tokens"),
    ("keep_tokens", 1.5, "--keep_tokens"),
    ("caption_dropout_every_n_epochs", -2, "--caption_dropout_every_n_epochs"),
    ("token_warmup_min", -1, "--token_warmup_min"),
    ("token_warmup_step", -1, "--token_warmup_step"),
    ("token_warmup_step", 150.5, "--token_warmup_step"),
    ("token_warmup_step", float("nan"), "--token_warmup_step"),
    ("caption_separator", "", "--caption_separator"),
])
def test_bad_values_name_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        CaptionOptions(**{field: value})


@pytest.mark.parametrize("step, max_steps, expected", [(0, 1000, 0), (0.5, 1000, 500), (0.333, 10, 3),
                                                       (0.01, 50, 0), (100, 1000, 100), (1.0, 5, 1), (250.0, 9, 250)])
def test_resolved_warmup_step(step, max_steps, expected):
    assert CaptionOptions(token_warmup_step=step).resolved_warmup_step(max_steps) == expected


# ---------------------------------------------------------------------------------------------- plain captions


def test_without_options_the_caption_is_untouched():
    # No re-joining happens unless shuffle / warmup / tag dropout ask for it (kohya: same condition).
    assert run("a,b ,  c") == "a,b ,  c"
    assert run("x {a|b} y") == "x {a|b} y"  # braces are only special with enable_wildcard


def test_multiline_without_wildcard_uses_first_nonempty_line():
    assert run("first, line\nsecond, line\n") == "first, line"
    assert run("\n  \nreal, caption\nother") == "real, caption"
    assert run("a, b\r\nc, d") == "a, b"
    assert run("") == "" and run("\n\n") == ""


def test_prefix_and_suffix_join_with_one_space():
    assert run("a, b", caption_prefix="pre", caption_suffix="suf") == "pre a, b suf"
    assert run("a, b", caption_prefix="masterpiece,") == "masterpiece, a, b"
    assert run("", caption_prefix="pre", caption_suffix="suf") == "pre suf"  # no stray space for an empty caption
    assert run("a", caption_prefix="", caption_suffix="") == "a"  # empty string = off, as kohya


def test_prefix_is_added_before_splitting_so_it_counts_as_part_of_a_kept_tag():
    # kohya adds prefix/suffix before the tag split: "sks" merges into the first tag and keep_tokens=1 keeps it.
    for seed in range(100):
        tags = split(run("a, b, c, d", seed=seed, shuffle_caption=True, keep_tokens=1, caption_prefix="sks",
                         caption_suffix="style"))
        assert tags[0] == "sks a"
        assert sorted(tags[1:]) == ["b", "c", "d style"]
    # A prefix ending in the separator is a tag of its own and uses up one keep_tokens slot.
    for seed in range(100):
        tags = split(run("a, b, c", seed=seed, shuffle_caption=True, keep_tokens=1, caption_prefix="sks,"))
        assert tags[0] == "sks" and sorted(tags[1:]) == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------- shuffle / keep


def test_keep_tokens_keeps_leading_tags_in_place_and_shuffle_preserves_the_multiset():
    orders = set()
    for seed in range(200):
        tags = split(run(TAGS, seed=seed, shuffle_caption=True, keep_tokens=2))
        assert tags[:2] == ["a", "b"]
        assert Counter(tags) == Counter(split(TAGS))
        orders.add(tuple(tags))
    assert len(orders) > 150  # it really shuffles (6! = 720 orders of the flexible part)


def test_shuffle_golden_equals_one_rng_shuffle_of_the_flexible_tags():
    # Hand-derived: with only shuffle on, the rng is used exactly once, for shuffling the tags after keep_tokens.
    for seed in (0, 1, 42, 1234):
        flex = ["c", "d", "e", "f", "g", "h"]
        random.Random(seed).shuffle(flex)
        assert run(TAGS, seed=seed, shuffle_caption=True, keep_tokens=2) == ", ".join(["a", "b"] + flex)


def test_fixed_seed_goldens():
    # Pinned outputs: a change here means resumed runs would no longer see the captions of the original run.
    # Hand check of the second: the rng shuffles all 8 tags, then draws once per tag (kept when >= 0.5).
    rng, tags = random.Random(2), list("abcdefgh")
    rng.shuffle(tags)
    assert ", ".join(t for t in tags if rng.random() >= 0.5) == "b, c, g, h, a"
    assert run(TAGS, seed=0, shuffle_caption=True, keep_tokens=2) == "a, b, g, e, d, c, h, f"
    assert run(TAGS, seed=2, shuffle_caption=True, caption_tag_dropout_rate=0.5) == "b, c, g, h, a"
    assert run("{red|blue} car, fast", seed=3, enable_wildcard=True) == "red car, fast"


def test_keep_tokens_separator_fixes_head_and_tail():
    raw = "1girl, solo ||| red hair, smile, hat, sky ||| best quality, masterpiece"
    for seed in range(100):
        tags = split(run(raw, seed=seed, shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||"))
        # keep_tokens is ignored when the separator is present (kohya)
        assert tags[:2] == ["1girl", "solo"] and tags[-2:] == ["best quality", "masterpiece"]
        assert sorted(tags[2:-2]) == ["hat", "red hair", "sky", "smile"]
    # Without the separator in a caption, keep_tokens applies.
    assert split(run("x, y, z", keep_tokens=1, keep_tokens_separator="|||", shuffle_caption=True))[0] == "x"


def test_keep_tokens_separator_is_removed_even_without_shuffle():
    # kohya leaves the literal "|||" in the text when no shuffle / warmup / tag dropout is on.
    assert run("a, b ||| c, d ||| e", keep_tokens_separator="|||") == "a, b, c, d, e"
    # A third separator stays inside the tail, as in kohya (split at most twice).
    assert run("a ||| b ||| c ||| d", keep_tokens_separator="|||") == "a, b, c ||| d"


def test_empty_tags_are_dropped():
    assert run("a,, b, ,c,", shuffle_caption=True, seed=0).count(",") == 2


@pytest.mark.parametrize("sep, joiner", [(",", ", "), ("|", "| "), (" | ", " | "), (" ", " "), (";;", ";; ")])
def test_caption_joiner(sep, joiner):
    assert caption_joiner(sep) == joiner


def test_custom_separator_survives_shuffling():
    # kohya #1304: re-joined with ", ", so "|"-separated tags came back comma-separated (and commas inside a tag
    # became tag boundaries for the text encoder). Here the user's separator stays.
    raw = "tall tree, green|red car|blue sky, clouds|dog"
    for seed in range(50):
        out = run(raw, seed=seed, shuffle_caption=True, caption_separator="|")
        assert Counter(split(out, "|")) == Counter(split(raw, "|"))
        assert "| " in out
    out = run("a | b | c", seed=1, shuffle_caption=True, caption_separator=" | ")
    assert sorted(out.split(" | ")) == ["a", "b", "c"]


def test_secondary_separator_glues_subtags_then_becomes_the_separator():
    raw = "a;;;b, c, d, e"
    for seed in range(50):
        out = run(raw, seed=seed, shuffle_caption=True, secondary_separator=";;;")
        assert "a,b" in out and ";;;" not in out  # moved as one unit, replaced verbatim (no space, as kohya)
    assert run(raw, secondary_separator=";;;") == "a,b, c, d, e"
    # tag dropout drops the glued unit as a whole
    for seed in range(50):
        out = run(raw, seed=seed, caption_tag_dropout_rate=0.5, secondary_separator=";;;")
        assert ("a" in split(out)) == ("b" in split(out))


# ---------------------------------------------------------------------------------------------- dropout


def test_caption_dropout_rate_is_about_p():
    rng = random.Random(123)
    opts = CaptionOptions(caption_dropout_rate=0.3)
    n = 10_000
    dropped = sum(process_caption("a, b", opts, rng=rng, epoch=1, step=0, max_train_steps=1) == "" for _ in range(n))
    assert abs(dropped / n - 0.3) < 0.02  # 4.4 standard deviations of a binomial(10k, 0.3) mean


def test_dropout_extremes_and_rng_use():
    assert all(run(TAGS, seed=s, caption_dropout_rate=1.0) == "" for s in range(20))
    # A zero rate draws nothing from the rng (kohya: `rate > 0 and random.random() < rate`).
    rng = random.Random(5)
    state = rng.getstate()
    process_caption(TAGS, CaptionOptions(), rng=rng, epoch=1, step=0, max_train_steps=1)
    assert rng.getstate() == state


def test_dropout_every_n_epochs_counts_epochs_from_one():
    dropped = [e for e in range(1, 11) if run(TAGS, epoch=e, caption_dropout_every_n_epochs=3) == ""]
    assert dropped == [3, 6, 9]
    assert all(run(TAGS, epoch=e, caption_dropout_every_n_epochs=1) == "" for e in range(1, 5))
    with pytest.raises(ValueError, match="epoch"):
        run(TAGS, epoch=0)


def test_dropout_wins_over_prefix():
    assert run("a", caption_prefix="sks", caption_dropout_every_n_epochs=1) == ""


def test_tag_dropout_only_touches_flexible_tags():
    kept = Counter()
    n = 2000
    for seed in range(n):
        tags = split(run(TAGS, seed=seed, caption_tag_dropout_rate=0.25, keep_tokens=1))
        assert tags[0] == "a"
        assert tags[1:] == [t for t in "bcdefgh" if t in tags[1:]]  # no shuffle: order kept
        kept.update(tags[1:])
    for tag in "bcdefgh":
        assert abs(kept[tag] / n - 0.75) < 0.05
    assert run(TAGS, caption_tag_dropout_rate=1.0, keep_tokens=2) == "a, b"


# ---------------------------------------------------------------------------------------------- token warmup


@pytest.mark.parametrize("step, expected_flex", [(0, 1), (1, 2), (3, 4), (8, 9), (9, 10), (500, 10)])
def test_token_warmup_count(step, expected_flex):
    # 10 flexible tags, min 1, warmup 9 steps: floor(step * 9 / 9) + 1 while step < 9, then all.
    raw = ", ".join(f"t{i}" for i in range(11))
    out = split(run(raw, step=step, keep_tokens=1, token_warmup_min=1, token_warmup_step=9))
    assert out == ["t0"] + [f"t{i}" for i in range(1, expected_flex + 1)]


def test_token_warmup_uses_exact_integer_floor():
    # 31 flexible tags, min 1, warmup 22 steps, step 11: 11 * 30 / 22 = 15 exactly -> 16 tags.
    # kohya's floor(11 * (30 / 22)) in floating point gives 14 -> 15 tags.
    raw = ", ".join(f"t{i}" for i in range(31))
    assert len(split(run(raw, step=11, token_warmup_step=22))) == 16


def test_token_warmup_fraction_of_max_train_steps():
    raw = ", ".join(f"t{i}" for i in range(21))  # 21 tags, min 1 -> 20 to add over 0.5 * 40 = 20 steps
    assert len(split(run(raw, step=5, max_train_steps=40, token_warmup_step=0.5))) == 6
    assert len(split(run(raw, step=20, max_train_steps=40, token_warmup_step=0.5))) == 21
    # a fraction that floors to 0 steps means no warmup and (with nothing else on) no re-joining
    assert run("a,b", step=0, max_train_steps=10, token_warmup_step=0.01) == "a,b"


def test_token_warmup_then_shuffle_keeps_the_first_tags():
    for seed in range(50):
        out = split(run(TAGS, seed=seed, step=0, shuffle_caption=True, token_warmup_min=3, token_warmup_step=10))
        assert sorted(out) == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------- wildcards


def test_wildcard_choices_and_escapes():
    seen = Counter(run("a {red|green|blue} car", seed=s, enable_wildcard=True) for s in range(300))
    assert set(seen) == {"a red car", "a green car", "a blue car"}
    assert run("{{a}}", enable_wildcard=True) == "{a}"
    assert run("{{a|b}}", enable_wildcard=True) == "{a|b}"
    assert run("x {} y", enable_wildcard=True) == "x {} y"  # an empty group is not a wildcard (kohya)
    assert {run("{a|}", seed=s, enable_wildcard=True) for s in range(50)} == {"a", ""}
    assert expand_wildcards("\ue000{a}", random.Random(0)) == "\ue000a"  # placeholders never clash with text


def test_multiline_with_wildcard_picks_a_random_nonempty_line_and_prefixes_each():
    raw = "one, x\n\ntwo, y\n  \nthree, z\n"
    seen = Counter(run(raw, seed=s, enable_wildcard=True, caption_prefix="p", caption_suffix="s") for s in range(300))
    assert set(seen) == {"p one, x s", "p two, y s", "p three, z s"}


def test_wildcards_are_expanded_before_shuffle():
    for seed in range(50):
        tags = split(run("{a|b}, c, d", seed=seed, enable_wildcard=True, shuffle_caption=True, keep_tokens=1))
        assert tags[0] in ("a", "b") and sorted(tags[1:]) == ["c", "d"]


# ---------------------------------------------------------------------------------------------- randomness


def test_same_seed_same_caption_and_global_random_untouched():
    opts = dict(shuffle_caption=True, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.2, enable_wildcard=True)
    raw = "{x|y}, " + TAGS + "\nline two, b, c"
    random.seed(99)
    state = random.getstate()
    first = [run(raw, seed=s, **opts) for s in range(30)]
    assert random.getstate() == state
    random.seed(1)  # a different global seed must not matter
    assert [run(raw, seed=s, **opts) for s in range(30)] == first


# ---------------------------------------------------------------------------------------------- caption files


def test_caption_path_for():
    assert caption_path_for(Path("/d/img.png"), ".txt") == Path("/d/img.txt")
    assert caption_path_for(Path("/d/img.png"), "caption") == Path("/d/img.caption")
    assert caption_path_for(Path("/d/a.b.jpg"), ".txt") == Path("/d/a.b.txt")
    with pytest.raises(ValueError, match="--caption_extension"):
        caption_path_for(Path("img.png"), "")


def test_read_caption_file(tmp_path):
    assert read_caption_file(tmp_path / "missing.txt") is None
    assert read_caption_file(tmp_path) is None  # a directory is not a caption file (kohya: os.path.isfile)

    ok = tmp_path / "ok.txt"
    ok.write_text("1girl, smile\nsecond line\n", encoding="utf-8")
    assert read_caption_file(ok) == "1girl, smile\nsecond line\n"

    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf1girl, caf\xc3\xa9")
    assert read_caption_file(bom) == "1girl, café"


@pytest.mark.parametrize("data, words", [(b"", "empty"), (b"  \n\t\n", "empty"),
                                         (b"caf\xe9 au lait", "not UTF-8")])
def test_unusable_caption_files_raise_with_file_name(tmp_path, data, words):
    path = tmp_path / "bad.caption"
    path.write_bytes(data)
    with pytest.raises(CaptionFileError, match=words) as info:
        read_caption_file(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    if words == "not UTF-8":
        assert "0xe9" in str(info.value) and "re-save" in str(info.value)


# ---------------------------------------------------------------------------------------------- tag frequency


def test_tag_frequency():
    captions = ["1girl, Solo, smile", " 1GIRL ,hat,, ", "solo"]
    assert tag_frequency(captions) == {"1girl": 2, "solo": 2, "smile": 1, "hat": 1}
    assert tag_frequency(["a|b c|a"], separator="|") == {"a": 2, "b c": 1}
    assert tag_frequency(["a, b\nb, c"]) == {"a": 1, "b": 2, "c": 1}
    assert tag_frequency([]) == {}


# ---------------------------------------------------------------------------------------------- A1111 weights


# The input/output pairs of the docstring of parse_prompt_attention in AUTOMATIC1111's modules/prompt_parser.py.
A1111_GOLDENS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, expected", A1111_GOLDENS)
def test_a1111_docstring_goldens(text, expected):
    assert parse_prompt_weights(text) == expected  # exact floats: same multiplication order as A1111


@pytest.mark.parametrize("text, expected", [
    ("", [("", 1.0)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word : 0.8 )", [("word ", 0.8)]),  # spaces around the weight, as current A1111
    ("((a:2) b)", [("a", 2 * 1.1), (" b", 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),  # closers without an opener are text
    ("(a:1.2", [("a:1.2", 1.1)]),  # no closing bracket: ":1.2" is text, the "(" applies to the end
    ("a:1.5) b", [("a:1.5) b", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # A1111 raises ValueError from float("1.2.3")
    ("a \\\\ b \\x", [("a \\ b x", 1.0)]),  # "\\" is a backslash; a lone backslash is dropped (A1111)
    ("(a)(b)[c]", [("ab", 1.1), ("c", 1 / 1.1)]),
])
def test_a1111_attention_rules(text, expected):
    got = parse_prompt_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_break_marker():
    assert parse_prompt_weights("a cat BREAK a dog") == [("a cat", 1.0), (BREAK, -1.0), ("a dog", 1.0)]
    assert parse_prompt_weights("a BREAK") == [("a", 1.0), (BREAK, -1.0), ("", 1.0)]  # A1111 keeps the empty tail
    assert parse_prompt_weights("BREAKFAST, aBREAK") == [("BREAKFAST, aBREAK", 1.0)]  # whole word only
    # Inside brackets the marker stays a marker (A1111 would turn it into the word "BREAK" with weight -1.1).
    assert parse_prompt_weights("(a BREAK b)") == [("a", 1.1), (BREAK, -1.0), ("b", 1.1)]
    # Two markers never merge into one "BREAKBREAK" segment.
    assert parse_prompt_weights("a BREAK BREAK b") == [("a", 1.0), (BREAK, -1.0), ("", 1.0), (BREAK, -1.0),
                                                       ("b", 1.0)]
