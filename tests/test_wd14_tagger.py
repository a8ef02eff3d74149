"""finetune/tag_images_by_wd14_tagger.py on tiny ONNX taggers built here with onnx.helper, whose outputs are known
exactly: the model averages each input channel over the image and maps the averages linearly to the outputs, so a
one-colour image gives one row of the weight table, and the preprocessing (BGR order, 0..255, white padding,
transparency on white) decides which row. The tag files are compared byte for byte with kohya's rules worked out
by hand for each option; merge_dd_tags_to_metadata.py reads them back.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from finetune import merge_dd_tags_to_metadata
from finetune.tag_images_by_wd14_tagger import main

onnx = pytest.importorskip("onnx")  # requirements-dev.txt: builds the test models
pytest.importorskip("onnxruntime")

SIZE = 8  # the tiny model's input size

# SmilingWolf's label file layout: ratings (9), then general (0), then character (4) tags. Per label, the output for
# a pure red, green and blue image (the model is linear in the channel means, so these are exact).
CSV_LABELS = [  # name, category, red, green, blue
    ("general", "9", 0.1, 0.6, 0.2),
    ("sensitive", "9", 0.7, 0.2, 0.2),
    ("questionable", "9", 0.1, 0.1, 0.5),
    ("explicit", "9", 0.05, 0.05, 0.05),
    ("1girl", "0", 0.9, 0.4, 0.0),
    ("long_hair", "0", 0.5, 0.8, 0.3),
    ("^_^", "0", 0.4, 0.0, 0.9),
    ("red_theme", "0", 0.95, 0.0, 0.0),
    ("simple_background", "0", 0.3, 0.3, 0.3),
    ("1boy", "0", 0.2, 0.9, 0.0),
    ("hatsune_miku_(vocaloid)", "4", 0.6, 0.2, 0.0),
    ("kiana_(honkai)_(impact)", "4", 0.8, 0.1, 0.45),
]


def linear_tagger(path, rows: np.ndarray, *, nchw: bool, batch: int | str = "batch", unit_range: bool = False):
    """An ONNX model: channel means of the input, scaled to 0..1 (from 0..255, or from -1..1 with `unit_range`),
    times `rows` ([3, labels], channel order B, G, R)."""
    from onnx import TensorProto, helper, numpy_helper

    shape = [batch, 3, SIZE, SIZE] if nchw else [batch, SIZE, SIZE, 3]
    scale = [numpy_helper.from_array(np.array(2.0 if unit_range else 255.0, np.float32), "scale"),
             numpy_helper.from_array(np.array(1.0 if unit_range else 0.0, np.float32), "shift"),
             numpy_helper.from_array(rows.astype(np.float32), "weights")]
    nodes = [helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[2, 3] if nchw else [1, 2], keepdims=0),
             helper.make_node("Add", ["mean", "shift"], ["shifted"]),
             helper.make_node("Div", ["shifted", "scale"], ["unit"]),
             helper.make_node("MatMul", ["unit", "weights"], ["predictions_sigmoid"])]
    graph = helper.make_graph(nodes, "tiny_tagger",
                              [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT,
                                                             [batch, rows.shape[1]])], initializer=scale)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def csv_model(folder, *, batch: int | str = "batch"):
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.array([[blue, green, red] for _, _, red, green, blue in CSV_LABELS]).T
    linear_tagger(folder / "model.onnx", rows, nchw=False, batch=batch)
    lines = ["tag_id,name,category,count"] + [f"{1000 + i},{name},{cat},{50 - i}"
                                              for i, (name, cat, *_) in enumerate(CSV_LABELS)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def solid(path, size, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    solid(folder / "red.png", (SIZE, SIZE), (255, 0, 0))
    solid(folder / "green.jpg", (16, 16), (0, 255, 0))  # shrunk (box): still pure green. JPEG: near, see below
    solid(folder / "blue.png", (4, 4), (0, 0, 255))  # enlarged (Lanczos): still pure blue
    return folder


def tags_of(folder, ext=".txt") -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted(folder.rglob("*" + ext))}


def run(folder, model_dir, *flags) -> None:
    assert main([str(folder), "--model_dir", str(model_dir), "--onnx", *flags]) == 0


def test_default_thresholds_and_layout(tmp_path, images):
    model = csv_model(tmp_path / "model")
    run(images, model)
    # --thresh 0.35: general tags then character tags, in label order, ", "-separated, one line
    assert tags_of(images) == {
        "blue": b"^_^, kiana_(honkai)_(impact)\n",
        "green": b"1girl, long_hair, 1boy\n",
        "red": b"1girl, long_hair, ^_^, red_theme, hatsune_miku_(vocaloid), kiana_(honkai)_(impact)\n",
    }
    # merge_dd_tags_to_metadata.py (default extension .txt as well) reads them into fine-tune metadata
    assert merge_dd_tags_to_metadata.main([str(images), str(tmp_path / "meta.json")]) == 0
    assert json.loads((tmp_path / "meta.json").read_text())["green"] == {"tags": "1girl, long_hair, 1boy"}


def test_category_thresholds(tmp_path, images):
    run(images, csv_model(tmp_path / "model"), "--general_threshold", "0.85", "--character_threshold", "0.75",
        "--caption_extension", ".tags")
    assert tags_of(images, ".tags") == {"blue": b"^_^\n", "green": b"1boy\n",
                                        "red": b"1girl, red_theme, kiana_(honkai)_(impact)\n"}


def test_name_options_rating_and_order(tmp_path, images):
    run(images, csv_model(tmp_path / "model"), "--remove_underscore", "--character_tag_expand",
        "--character_tags_first", "--use_rating_tags", "--undesired_tags", "red theme,explicit",
        "--always_first_tags", "long hair, 1girl")
    # red: general 1girl, long hair, ^_^ (kept: 3 characters), [red theme undesired]; each character tag inserted
    # in front (kiana before miku); the rating (sensitive, 0.7) in front of that; then "long hair" and "1girl"
    # moved to the front in turn.
    assert tags_of(images)["red"] == \
        b"1girl, long hair, sensitive, kiana (honkai), impact, hatsune miku, vocaloid, ^_^\n"
    assert tags_of(images)["green"] == b"1girl, long hair, general, 1boy\n"
    assert tags_of(images)["blue"] == b"questionable, kiana (honkai), impact, ^_^\n"


def test_rating_last_replacement_separator_and_append(tmp_path, images):
    model = csv_model(tmp_path / "model")
    (images / "red.txt").write_text("mine | 1girl\n", encoding="utf-8")
    run(images, model, "--caption_separator", " | ", "--use_rating_tags_as_last_tag", "--append_tags",
        "--tag_replacement", "1girl,one girl;^_^,smile\\, happy;red_theme,1girl", "--undesired_tags", "long_hair")
    # replaced names: 1girl -> "one girl", ^_^ -> "smile, happy", red_theme -> "1girl" (already in red's file)
    assert tags_of(images) == {
        "blue": b"smile, happy | kiana_(honkai)_(impact) | questionable\n",
        "green": b"one girl | 1boy | general\n",
        "red": b"mine | 1girl | one girl | smile, happy | hatsune_miku_(vocaloid) | kiana_(honkai)_(impact) | "
               b"sensitive\n",
    }


def test_preprocessing_white_padding_and_transparency(tmp_path):
    folder = tmp_path / "imgs"
    # 8x4 red: padded to 8x8 with white, so B and G average 127.5 -> red row + half green + half blue
    solid(folder / "wide_red.png", (SIZE, SIZE // 2), (255, 0, 0))
    # fully transparent (red under it): white after compositing -> the three rows summed
    solid(folder / "clear.png", (SIZE, SIZE), (255, 0, 0, 0), mode="RGBA")
    run(folder, csv_model(tmp_path / "model"), "--thresh", "1.0", "--character_threshold", "0.65")
    assert tags_of(folder) == {
        "clear": b"1girl, long_hair, ^_^, 1boy, hatsune_miku_(vocaloid), kiana_(honkai)_(impact)\n",
        "wide_red": b"1girl, long_hair, hatsune_miku_(vocaloid), kiana_(honkai)_(impact)\n",
    }


def test_batches_workers_and_fixed_batch_model(tmp_path, images):
    want = None
    for name, flags, batch in (("dynamic", ["--batch_size", "2"], "batch"),
                               ("workers", ["--batch_size", "3", "--max_data_loader_n_workers", "1"], "batch"),
                               ("fixed", ["--batch_size", "1"], 2)):  # a model that takes batches of 2 only
        for old in images.glob("*.txt"):
            old.unlink()
        run(images, csv_model(tmp_path / name, batch=batch), *flags)
        got = tags_of(images)
        assert len(got) == 3 and got == (want or got)
        want = got


def test_output_path_and_frequencies(tmp_path, images, capsys):
    model = csv_model(tmp_path / "model")
    run(images, model, "--output_path", str(tmp_path / "tags.json"), "--frequency_tags", "--thresh", "0.85")
    assert not list(images.glob("*.txt"))
    assert json.loads((tmp_path / "tags.json").read_text()) == {
        str(images / "blue.png"): {"tags": "^_^", "image_size": [4, 4]},
        str(images / "green.jpg"): {"tags": "1boy", "image_size": [16, 16]},
        str(images / "red.png"): {"tags": "1girl, red_theme", "image_size": [8, 8]},
    }
    assert capsys.readouterr().out == "Tag frequencies:\n^_^: 1\n1boy: 1\n1girl: 1\nred_theme: 1\n"
    run(images, model, "--output_path", str(tmp_path / "tags.jsonl"), "--thresh", "0.85")
    first = json.loads((tmp_path / "tags.jsonl").read_text().splitlines()[0])
    assert first == {"image_path": str(images / "blue.png"), "caption": "^_^", "image_size": [4, 4]}


def test_recursive_and_kohya_model_location(tmp_path, images):
    solid(images / "sub" / "deep.png", (SIZE, SIZE), (0, 255, 0))
    # kohya's download folder for --repo_id: <model_dir>/<namespace>_<name>
    csv_model(tmp_path / "wd14_tagger_model" / "SmilingWolf_wd-vit-tagger-v3")
    assert main([str(images), "--recursive", "--model_dir", str(tmp_path / "wd14_tagger_model"),
                 "--repo_id", "SmilingWolf/wd-vit-tagger-v3"]) == 0
    assert (images / "sub" / "deep.txt").read_bytes() == b"1girl, long_hair, 1boy\n"


# The json layout (kohya's second one, `model_optimized.onnx` + `tag_mapping.json`): NCHW input in -1..1, logits.
JSON_LABELS = [  # name, category, logit for a red image (green and blue images give 0)
    ("general", "Rating", -1.0), ("sensitive", "Rating", 0.2),
    ("1girl", "General", 2.0), ("solo", "General", 1.0),
    ("masterpiece", "Quality", 1.5), ("best_quality", "Quality", 0.5),
    ("vocaloid", "Copyright", 0.3), ("highres", "Meta", 0.0), ("someone", "Artist", -0.5),
    ("miku_(vocaloid)", "Character", 0.8), ("animagine", "Model", -3.0),
]


def json_model(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.zeros((3, len(JSON_LABELS)))
    rows[2] = [logit for *_, logit in JSON_LABELS]  # the R channel (last in BGR)
    linear_tagger(folder / "model_optimized.onnx", rows, nchw=True, unit_range=True)
    mapping = {str(i): {"tag": name, "category": cat} for i, (name, cat, _) in enumerate(JSON_LABELS)}
    (folder / "tag_mapping.json").write_text(json.dumps(mapping), encoding="utf-8")
    return folder


def test_tag_mapping_layout(tmp_path):
    folder = tmp_path / "imgs"
    solid(folder / "red.png", (SIZE, SIZE), (255, 0, 0))
    root = tmp_path / "models"
    json_model(root / "someone_tagger" / "v1")
    flags = ["--model_dir", str(root), "--repo_id", "someone/tagger/v1"]
    assert main([str(folder), *flags]) == 0
    # sigmoid: 1girl .88, solo .73, miku .69, vocaloid .57, highres .5, someone .38 (>= 0.35), by probability
    assert (folder / "red.txt").read_bytes() == b"1girl, solo, miku_(vocaloid), vocaloid, highres, someone\n"
    assert main([str(folder), *flags, "--character_tags_first", "--copyright_threshold", "0.6", "--use_quality_tags",
                 "--use_rating_tags_as_last_tag", "--undesired_tags", "solo"]) == 0
    assert (folder / "red.txt").read_bytes() == b"masterpiece, miku_(vocaloid), 1girl, highres, someone, sensitive\n"
    # outputs the mapping leaves out (solo; the last one, animagine) are skipped, as kohya skips them
    mapping_file = root / "someone_tagger" / "v1" / "tag_mapping.json"
    mapping = json.loads(mapping_file.read_text())
    del mapping["3"], mapping[str(len(JSON_LABELS) - 1)]
    mapping_file.write_text(json.dumps(mapping))
    assert main([str(folder), *flags]) == 0
    assert (folder / "red.txt").read_bytes() == b"1girl, miku_(vocaloid), vocaloid, highres, someone\n"


def test_errors_name_the_problem(tmp_path, images, capsys, monkeypatch):
    def error(*argv) -> str:
        assert main([str(a) for a in argv]) == 1
        return capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    message = error(images, "--model_dir", empty)
    assert "nothing is downloaded" in message and "huggingface-cli download SmilingWolf/wd-v1-4-convnext-tagger-v2 " \
        "model.onnx selected_tags.csv --local-dir " + str(empty / "SmilingWolf_wd-v1-4-convnext-tagger-v2") in message
    (empty / "saved_model.pb").write_bytes(b"")
    assert "TensorFlow SavedModel" in error(images, "--model_dir", empty)
    model = csv_model(tmp_path / "model")
    assert "--force_download" in error(images, "--model_dir", model, "--force_download")
    assert "'1girl' is not 'source,target'" in error(images, "--model_dir", model, "--tag_replacement", "1girl")
    assert "no images" in error(empty, "--model_dir", model)
    other = tmp_path / "other"
    csv_model(other)
    (other / "selected_tags.csv").write_text("tag_id,name,category,count\n1,a,0,1\n")
    assert "has 12 outputs but its label file has 1 labels" in error(images, "--model_dir", other)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "onnxruntime is not installed" in error(images, "--model_dir", model)
    monkeypatch.undo()
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    message = error(images, "--model_dir", model)
    assert "1 image(s) were not tagged" in message and "broken.png" in message
    assert (images / "red.txt").is_file()  # the others are tagged


def test_category_flags_a_csv_model_lacks_are_reported(tmp_path, images, caplog):
    run(images, csv_model(tmp_path / "model"), "--use_quality_tags", "--meta_threshold", "0.5")
    assert "--meta_threshold, --use_quality_tags" in caplog.text and "changes nothing" in caplog.text
