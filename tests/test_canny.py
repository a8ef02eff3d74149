"""tools/canny.py and library/canny.py: edge maps bit-identical to OpenCV's (kohya's tools/canny.py), a folder mode
that writes a ready `--conditioning_data_dir`, and errors that name the file.

The OpenCV side is stored: tests/golden/make_canny_golden.py ran kohya's exact pipeline (cv2.imread ->
cvtColor(BGR2GRAY) -> cv2.Canny) over small synthetic images at several threshold pairs, so OpenCV is not needed
here."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.canny import canny, rgb_to_gray
from library.dataset_sources import Subset, scan_subset
from tools import canny as canny_tool

GOLDEN = Path(__file__).resolve().parent / "golden" / "canny"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text(encoding="utf-8"))


def case_id(case: dict) -> str:
    return Path(case["expected"]).stem


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def as_edge_map(path: Path) -> np.ndarray:
    """An edge map file as written by the tool: RGB with three equal 0/255 channels -> [H, W]."""
    rgb = pixels(path)
    assert rgb.ndim == 3 and rgb.shape[2] == 3, f"{path} is not a 3-channel image: {rgb.shape}"
    assert (rgb == rgb[..., :1]).all() and set(np.unique(rgb)) <= {0, 255}
    return rgb[..., 0]


# ----------------------------------------------------------------------------------------------------------
# Exactness against OpenCV


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=case_id)
def test_edge_map_equals_opencv(case):
    expected = pixels(GOLDEN / case["expected"])
    ours = np.asarray(canny_tool.edge_map(GOLDEN / case["input"], case["thres1"], case["thres2"],
                                          l2_gradient=case["l2gradient"]))[..., 0]
    assert ours.shape == expected.shape
    differ = int((ours != expected).sum())
    assert differ == 0, f"{differ} of {expected.size} pixels differ from OpenCV {MANIFEST['opencv']}"


def test_golden_cases_cover_the_tricky_parts():
    cases = MANIFEST["cases"]
    assert {(c["thres1"], c["thres2"], c["l2gradient"]) for c in cases} >= {(32, 224, False), (200, 50, False),
                                                                             (32, 224, True)}
    # Thresholds matter on these images (otherwise the threshold handling would go untested).
    by_input: dict[str, set[int]] = {}
    for c in cases:
        by_input.setdefault(c["input"], set()).add(c["edge_pixels"])
    assert sum(len(counts) > 1 for counts in by_input.values()) >= 5


def test_gray_conversion_is_opencvs_fixed_point():
    # cv2.cvtColor(BGR2GRAY) on 8-bit: (9798 R + 19235 G + 3735 B + 2**14) >> 15; values taken from OpenCV 4.14.
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [17, 17, 17], [1, 2, 200],
                     [138, 167, 72], [90, 215, 249]]], np.uint8)
    assert rgb_to_gray(rgb).tolist() == [[76, 150, 29, 255, 17, 24, 148, 181]]
    # PIL's convert("L") rounds differently on the last two (147, 182): why the tool does not use it.
    assert np.asarray(Image.fromarray(rgb).convert("L"))[0, -2:].tolist() == [147, 182]


def test_canny_contract():
    step = np.zeros((12, 12), np.uint8)
    step[:, 6:] = 200  # |dx| = 800 at the step
    edges = canny(step, 32, 224)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    assert edges[:, 5].all() and not edges[:, :5].any() and not edges[:, 6:].any()  # one pixel wide, no blur
    assert (canny(step, 224, 32) == edges).all()  # thresholds in either order, as cv2.Canny
    assert not canny(step, 900, 900).any()  # magnitude must exceed the high threshold
    assert canny(step, 799, 799).any()
    with pytest.raises(ValueError, match="uint8"):
        canny(step.astype(np.float32), 32, 224)


def test_transparency_is_composited_onto_white(tmp_path):
    # Unlike cv2.imread (which drops alpha and keeps whatever colour hides under it), the edge map follows the
    # image the trainer sees.
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[6:18, 6:18] = (255, 0, 0, 255)  # opaque red square on fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    white = np.full((24, 24, 3), 255, np.uint8)
    white[6:18, 6:18] = (255, 0, 0)
    expected = canny(rgb_to_gray(white), 32, 224)
    assert (np.asarray(canny_tool.edge_map(tmp_path / "a.png", 32, 224))[..., 0] == expected).all()


# ----------------------------------------------------------------------------------------------------------
# Single image (kohya's interface)


def test_single_image_like_kohya(tmp_path):
    source = GOLDEN / "inputs" / "shapes.png"
    out = tmp_path / "edges" / "shapes_canny.png"
    assert canny_tool.main(["--input", str(source), "--output", str(out)]) == 0  # kohya's defaults 32 / 224
    assert (as_edge_map(out) == pixels(GOLDEN / "shapes_32_224.png")).all()
    # Written again when asked again (an explicitly named file is always written), with other thresholds.
    assert canny_tool.main(["--input", str(source), "--output", str(out), "--thres1", "100", "--thres2", "200",
                            "--l2gradient"]) == 0
    assert (as_edge_map(out) == pixels(GOLDEN / "shapes_100_200_l2.png")).all()
    # An existing folder as --output gets <stem>.png.
    assert canny_tool.main(["--input", str(source), "--output", str(tmp_path)]) == 0
    assert (as_edge_map(tmp_path / "shapes.png") == pixels(GOLDEN / "shapes_32_224.png")).all()


# ----------------------------------------------------------------------------------------------------------
# Folder mode


def make_folder(root: Path) -> Path:
    folder = root / "img"
    (folder / "sub").mkdir(parents=True)
    for name, seed in (("a.png", 0), ("b.jpg", 1), ("sub/c.webp", 2), ("sub/d.png", 3)):
        rgb = np.zeros((32, 40, 3), np.uint8)
        rgb[8 + seed:24, 10:30 - seed] = (200, 60 * seed, 90)
        Image.fromarray(rgb).save(folder / name)
    (folder / "a.txt").write_text("a caption", encoding="utf-8")  # not an image: ignored
    return folder


def test_folder_keeps_stems_and_pairs_with_the_training_images(tmp_path):
    folder = make_folder(tmp_path)
    out = tmp_path / "cond"
    assert canny_tool.main(["--input", str(folder), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]  # .jpg -> .png, no subfolder
    assert (as_edge_map(out / "b.png") == np.asarray(canny_tool.edge_map(folder / "b.jpg", 32, 224))[..., 0]).all()
    assert as_edge_map(out / "a.png").any()
    # The output is a conditioning folder the trainer accepts as it is.
    records, _ = scan_subset(Subset(image_dir=folder, conditioning_dir=out))
    assert {r.path.name: r.conditioning.name for r in records} == {"a.png": "a.png", "b.jpg": "b.png"}

    out2 = tmp_path / "cond_all"
    assert canny_tool.main(["--input", str(folder), "--output", str(out2), "--recursive", "--thres1", "10",
                            "--thres2", "50"]) == 0
    assert sorted(str(p.relative_to(out2)) for p in out2.rglob("*.png")) == ["a.png", "b.png", "sub/c.png",
                                                                              "sub/d.png"]
    expected = np.asarray(canny_tool.edge_map(folder / "sub" / "c.webp", 10, 50))[..., 0]
    assert (as_edge_map(out2 / "sub" / "c.png") == expected).all()


def test_folder_skips_existing_unless_overwrite(tmp_path, caplog):
    folder = make_folder(tmp_path)
    out = tmp_path / "cond"
    assert canny_tool.main(["--input", str(folder), "--output", str(out)]) == 0
    fresh = as_edge_map(out / "a.png").copy()
    Image.new("RGB", (5, 5), (1, 2, 3)).save(out / "a.png")  # stands for a map made with other thresholds
    (out / "b.png").unlink()  # stands for an interrupted run
    with caplog.at_level(logging.INFO, logger="canny"):
        assert canny_tool.main(["--input", str(folder), "--output", str(out)]) == 0
    assert pixels(out / "a.png").shape == (5, 5, 3)  # kept
    assert (out / "b.png").is_file()  # done
    assert "wrote 1 edge map" in caplog.text and "skipped 1 existing" in caplog.text and "--overwrite" in caplog.text
    assert canny_tool.main(["--input", str(folder), "--output", str(out), "--overwrite"]) == 0
    assert (as_edge_map(out / "a.png") == fresh).all()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


# ----------------------------------------------------------------------------------------------------------
# Errors name the file


def fails(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert canny_tool.main(list(argv)) == 1
    return capsys.readouterr().err


def test_unreadable_image_is_named_and_the_others_are_done(tmp_path, capsys):
    folder = make_folder(tmp_path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "cond"
    err = fails(capsys, "--input", str(folder), "--output", str(out))
    assert str(folder / "broken.png") in err and str(folder / "empty.jpg") in err and "2 image(s)" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    # Single-image mode: the same message, nothing written.
    err = fails(capsys, "--input", str(folder / "broken.png"), "--output", str(tmp_path / "x.png"))
    assert str(folder / "broken.png") in err and "not a readable image" in err
    assert not (tmp_path / "x.png").exists()


def test_output_equal_to_or_inside_input(tmp_path, capsys):
    folder = make_folder(tmp_path)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    err = fails(capsys, "--input", str(folder), "--output", str(tmp_path / "img" / "sub" / ".."))
    assert "same folder as --input" in err and str(folder) in err
    err = fails(capsys, "--input", str(folder), "--output", str(folder / "edges"), "--recursive")
    assert "inside --input" in err and "--recursive" in err
    err = fails(capsys, "--input", str(folder / "a.png"), "--output", str(folder / "a.png"))
    assert "same as the input" in err and "a.png" in err
    err = fails(capsys, "--input", str(folder / "a.png"), "--output", str(folder))  # -> folder/a.png
    assert "same as the input" in err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # Without --recursive, a subfolder of the input is a fine place for the edge maps.
    assert canny_tool.main(["--input", str(folder), "--output", str(folder / "edges")]) == 0


@pytest.mark.parametrize("where", ["parent_is_a_file", "proc", "no_permission"])
def test_unwritable_output_folder(tmp_path, capsys, monkeypatch, where):
    folder = make_folder(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"I am a file")
    out = {"parent_is_a_file": blocker / "cond", "proc": Path("/proc/canny_cond"),
           "no_permission": tmp_path / "cond"}[where]
    if where == "no_permission":
        out.mkdir()
        monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # what chmod does for non-root users
    err = fails(capsys, "--input", str(folder), "--output", str(out))
    assert str(out) in err and "choose another output path" in err
    assert blocker.read_bytes() == b"I am a file"


def test_other_bad_arguments(tmp_path, capsys):
    folder = make_folder(tmp_path)
    err = fails(capsys, "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert "nope" in err and "no such image file or folder" in err
    (tmp_path / "empty").mkdir()
    err = fails(capsys, "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"))
    assert "empty" in err and "no images" in err and "--recursive" in err
    (tmp_path / "o.png").write_bytes(b"x")
    err = fails(capsys, "--input", str(folder), "--output", str(tmp_path / "o.png"))
    assert "o.png is a file" in err
    err = fails(capsys, "--input", str(folder / "a.png"), "--output", str(tmp_path / "edges"))
    assert "ending in .png" in err
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")  # a.png and a.jpg would both become a.png
    err = fails(capsys, "--input", str(folder), "--output", str(tmp_path / "cond"))
    assert "a.jpg" in err and "a.png" in err and "same stem" in err
    with pytest.raises(SystemExit) as e:
        canny_tool.main(["--input", str(folder), "--output", str(tmp_path / "c"), "--thres1", "-1"])
    assert e.value.code == 2 and "--thres1 must be >= 0" in capsys.readouterr().err
