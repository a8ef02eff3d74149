"""--dataset_name as Hugging Face `datasets` data on disk (parquet file / hub folder of shards, save_to_disk folders):
extracted to image files whose pixels equal what `datasets` itself decodes, a metadata.jsonl with the dataset's
column names, reused only while the source is unchanged; bad column names listed; one ControlNet run on parquet."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.hf_datasets import CACHE_DIR_NAME, Columns, DatasetSourceError, image_folder_for
from tests.test_train_controlnet import base_args, draw_pair, logged_losses, run

datasets = pytest.importorskip("datasets")  # requirements-dev.txt: builds the fixtures as users' tools write them

COLUMNS = Columns(image="image", conditioning_image="conditioning_image", caption="text")
SIZES = [(64, 64), (96, 64), (64, 96), (64, 64), (80, 48)]


def make_dataset(sizes=SIZES, caption="a box, number {}"):
    """A `datasets.Dataset` with the Image feature in two columns; one photo is a JPEG (kept as JPEG bytes)."""
    photos, edges = [], []
    for i, size in enumerate(sizes):
        photo, edge = draw_pair(i, size)
        if i == 1:
            buffer = io.BytesIO()
            photo.save(buffer, format="JPEG", quality=90)
            photo = Image.open(io.BytesIO(buffer.getvalue()))  # format JPEG: `datasets` stores JPEG bytes
        photos.append(photo)
        edges.append(edge)
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string"), "extra": datasets.Value("int32")})
    return datasets.Dataset.from_dict({"image": photos, "conditioning_image": edges,
                                       "text": [caption.format(i) for i in range(len(sizes))],
                                       "extra": list(range(len(sizes)))}, features=features)


def assert_extracted(folder: Path, ds, columns: Columns = COLUMNS) -> list[dict]:
    """metadata.jsonl lists every row in order, with the dataset's column names; every file decodes to the pixels
    `datasets` decodes for that cell."""
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == len(ds)
    for entry, row in zip(lines, ds):
        assert set(entry) == {columns.image, columns.conditioning_image, columns.caption}
        assert entry[columns.caption] == row[columns.caption]
        for name in (columns.image, columns.conditioning_image):
            extracted = Image.open(folder / entry[name])
            assert extracted.format == row[name].format  # the embedded bytes, written as they are
            assert np.array_equal(np.asarray(extracted), np.asarray(row[name]))
    return lines


def test_parquet_file(tmp_path):
    ds = make_dataset()
    ds.to_parquet(str(tmp_path / "fill.parquet"))
    folder = image_folder_for(tmp_path / "fill.parquet", COLUMNS, progress=False)
    assert folder == tmp_path / CACHE_DIR_NAME / "file-fill.parquet"
    lines = assert_extracted(folder, ds)
    assert lines[0] == {"image": "image/000000.png", "conditioning_image": "conditioning_image/000000.png",
                        "text": "a box, number 0"}
    assert lines[1]["image"] == "image/000001.jpg"


def test_hub_folder_of_parquet_shards_uses_the_train_split(tmp_path):
    """The hub layout (data/train-0000N-of-0000M.parquet): shards read in order, other splits left out."""
    ds = make_dataset()
    root = tmp_path / "fill50k"
    (root / "data").mkdir(parents=True)
    ds.select(range(3)).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(3, 5)).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
    make_dataset(sizes=[(32, 32)]).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    folder = image_folder_for(root, COLUMNS, progress=False)
    assert folder == root / CACHE_DIR_NAME / "dataset"
    assert_extracted(folder, ds)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    ds = make_dataset()
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    assert_extracted(image_folder_for(tmp_path / "saved", COLUMNS, progress=False), ds)

    other = make_dataset(sizes=[(32, 32)], caption="test {}")
    datasets.DatasetDict({"test": other, "train": ds}).save_to_disk(str(tmp_path / "dict"))
    assert_extracted(image_folder_for(tmp_path / "dict", COLUMNS, progress=False), ds)

    datasets.DatasetDict({"test": other}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DatasetSourceError, match="no 'train' split.*it has: test"):
        image_folder_for(tmp_path / "no_train", COLUMNS, progress=False)


def test_reused_while_unchanged_and_extracted_again_when_changed(tmp_path, monkeypatch):
    import library.hf_datasets as hf

    source = tmp_path / "d.parquet"
    make_dataset().to_parquet(str(source))
    folder = image_folder_for(source, COLUMNS, progress=False)
    first_key = (folder / "source.json").read_text()

    calls = []
    real_extract = hf.extract
    monkeypatch.setattr(hf, "extract", lambda *a, **k: (calls.append(1), real_extract(*a, **k)))
    assert image_folder_for(source, COLUMNS, progress=False) == folder
    assert calls == []  # unchanged: nothing extracted again
    assert (folder / "source.json").read_text() == first_key

    # A changed source (other pixels and captions; fewer rows): extracted again, nothing stale left.
    changed = make_dataset(sizes=[(48, 48), (64, 32)], caption="changed {}")
    changed.to_parquet(str(source))
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # however coarse the file system's clock
    assert image_folder_for(source, COLUMNS, progress=False) == folder
    assert calls == [1]
    assert_extracted(folder, changed)
    assert sorted(p.name for p in (folder / "image").iterdir()) == ["000000.png", "000001.jpg"]

    # Other columns asked for: extracted again with those names.
    swapped = Columns(image="conditioning_image", conditioning_image="image", caption="text")
    image_folder_for(source, swapped, progress=False)
    assert calls == [1, 1]
    assert_extracted(folder, changed, swapped)

    # An interrupted extraction (no key written) is never used.
    monkeypatch.setattr(hf, "_flush_to_disk", lambda target: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        image_folder_for(source, COLUMNS, progress=False)
    assert not (folder / "source.json").exists()
    monkeypatch.undo()
    assert_extracted(image_folder_for(source, COLUMNS, progress=False), changed)


def test_path_only_cells_and_formats_the_trainer_cannot_read(tmp_path):
    """Image cells that hold a path (not embedded) are used in place; a TIFF is re-encoded losslessly as PNG."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    photo, edges = draw_pair(0, (40, 24))
    photo.save(tmp_path / "photo.png")
    tiff = io.BytesIO()
    edges.save(tiff, format="TIFF")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": None, "path": "photo.png"}], struct),
                      "conditioning_image": pa.array([{"bytes": tiff.getvalue(), "path": None}], struct),
                      "text": ["a photo"]})
    pq.write_table(table, tmp_path / "paths.parquet")
    folder = image_folder_for(tmp_path / "paths.parquet", COLUMNS, progress=False)
    entry = json.loads((folder / "metadata.jsonl").read_text())
    assert entry == {"image": str(tmp_path / "photo.png"), "conditioning_image": "conditioning_image/000000.png",
                     "text": "a photo"}
    assert np.array_equal(np.asarray(Image.open(folder / entry["conditioning_image"])), np.asarray(edges))

    table = table.set_column(0, "image", pa.array([{"bytes": None, "path": "gone.png"}], struct))
    pq.write_table(table, tmp_path / "gone.parquet")
    with pytest.raises(DatasetSourceError, match="row 0 column 'image'.*'gone.png' is no file"):
        image_folder_for(tmp_path / "gone.parquet", COLUMNS, progress=False)


def test_bad_columns_and_paths_name_the_flag(tmp_path):
    import train_controlnet
    from library import train_args

    make_dataset().to_parquet(str(tmp_path / "d.parquet"))

    def error(*extra: str) -> str:
        args = train_args.parse_args(train_controlnet.setup_parser(), [
            "--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path / "o"), *extra])
        with pytest.raises(SystemExit) as info:
            train_controlnet.diffusers_example_flags(args)
        return str(info.value.code)

    data = ["--dataset_name", str(tmp_path / "d.parquet")]
    message = error(*data, "--conditioning_image_column", "edges", "--caption_column", "prompt")
    assert "no column 'edges' (--conditioning_image_column)" in message
    assert "no column 'prompt' (--caption_column)" in message
    assert "the dataset has: image, conditioning_image, text, extra" in message
    assert "--image_column" not in message
    assert "(--image_column) holds int32, not images" in error(*data, "--image_column", "extra")
    assert "no such file or folder" in error("--dataset_name", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "neither metadata.jsonl" in error("--dataset_name", str(tmp_path / "empty"))
    assert not (tmp_path / CACHE_DIR_NAME).exists()  # nothing extracted for a bad request


def test_read_only_dataset_folder_extracts_to_the_user_cache(tmp_path, monkeypatch):
    import library.hf_datasets as hf

    ds = make_dataset(sizes=[(32, 32)])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    monkeypatch.setattr(hf, "_can_write", lambda folder: False)  # (os.access says yes to root whatever the mode)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = image_folder_for(tmp_path / "d.parquet", COLUMNS, progress=False)
    assert folder.parent == tmp_path / "cache" / "sdtrain" / "datasets"
    assert_extracted(folder, ds)
    assert not (tmp_path / CACHE_DIR_NAME).exists()


def test_image_folder_with_metadata_is_used_as_it_is(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"image": "a.png", "conditioning_image": "b.png", "text": "x"}\n')
    (tmp_path / "train.parquet").write_bytes(b"not read")
    assert image_folder_for(tmp_path, COLUMNS, progress=False) == tmp_path


def test_train_controlnet_on_a_parquet_dataset(tmp_path):
    from tools.make_tiny_model import main as make_model

    assert make_model(["--family", "sd1", str(tmp_path / "sd1.safetensors")]) == 0
    root = tmp_path / "hub"
    (root / "data").mkdir(parents=True)
    make_dataset().to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    run(base_args(tmp_path, "out") + ["--dataset_name", str(root), "--max_train_steps", "2"])
    losses = logged_losses(tmp_path / "out" / "logs")
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (tmp_path / "out" / "cn.safetensors").is_file()
    assert len((root / CACHE_DIR_NAME / "dataset" / "metadata.jsonl").read_text().splitlines()) == len(SIZES)
