"""kohya's Hugging Face Hub flags (library/hub_upload.py), against a stand-in for huggingface_hub's HfApi (nothing
leaves the machine): what is uploaded where, asynchronous uploads waited for, failures that lose nothing, and
--resume_from_huggingface."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from library.hub_upload import HubSettings, HubUploader, download_state, parse_hub_state
from library.safetensors_io import SafetensorsReader
from tests.recipe_helpers import run_script


class FakeHub:
    """Records create_repo / upload_file / upload_folder; `fail` makes uploads raise; `delay` slows them."""

    instances: list["FakeHub"] = []

    def __init__(self, token=None, fail: bool = False, delay: float = 0.0):
        self.token, self.fail, self.delay = token, fail, delay
        self.calls: list[tuple] = []
        self.threads: set[str] = set()
        FakeHub.instances.append(self)

    def create_repo(self, repo_id, *, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def _upload(self, kind, path, path_in_repo, repo_id, repo_type):
        time.sleep(self.delay)
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise ConnectionError("no route to huggingface.co")
        assert Path(path).exists()  # still there when uploaded (pruning waits)
        self.calls.append((kind, Path(path).name, path_in_repo, repo_id, repo_type))

    def upload_file(self, *, repo_id, repo_type, path_or_fileobj, path_in_repo):
        self._upload("file", path_or_fileobj, path_in_repo, repo_id, repo_type)

    def upload_folder(self, *, repo_id, repo_type, folder_path, path_in_repo):
        self._upload("folder", folder_path, path_in_repo, repo_id, repo_type)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("hub")
    write_dataset(root / "data", images=4, size=64, seed=0, folder="1_sks shape")
    assert make_model(["--family", "sd1", str(root / "sd1.safetensors")]) == 0
    return root


def args(root: Path, out: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "lora", "--resolution", "64", "--network_dim", "4",
            "--learning_rate", "1e-3", "--seed", "7", "--train_batch_size", "2", "--max_data_loader_n_workers", "0",
            "--cache_latents", "--max_train_steps", "4", *extra]


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub.instances


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_every_save_and_state_is_uploaded_where_kohya_puts_it(workspace, fake_hub, asynchronous):
    out = f"up_{asynchronous}"
    run_script("train_network", args(workspace, out, "--save_every_n_steps", "2", "--save_state",
                                     "--huggingface_repo_id", "me/tiny-lora", "--huggingface_path_in_repo", "runs/a",
                                     "--save_state_to_huggingface", *(["--async_upload"] if asynchronous else [])))
    (hub,) = fake_hub
    assert hub.calls == [
        ("create_repo", "me/tiny-lora", "model", True, True),  # private unless --huggingface_repo_visibility public
        ("file", "lora-step00000002.safetensors", "runs/a/lora-step00000002.safetensors", "me/tiny-lora", "model"),
        ("folder", "lora-step00000002-state", "runs/a/lora-step00000002-state", "me/tiny-lora", "model"),
        ("file", "lora.safetensors", "runs/a/lora.safetensors", "me/tiny-lora", "model"),
        ("folder", "lora-state", "runs/a/lora-state", "me/tiny-lora", "model")]
    assert all(name.startswith("hub-upload") for name in hub.threads) == asynchronous


def test_a_failed_upload_loses_nothing_and_names_the_file(workspace, monkeypatch, caplog):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: FakeHub(token, fail=True))
    run_script("train_network", args(workspace, "failing", "--huggingface_repo_id", "me/tiny-lora",
                                     "--huggingface_repo_visibility", "public"))
    assert (workspace / "failing" / "lora.safetensors").is_file()
    assert "upload of lora.safetensors to the Hugging Face repository me/tiny-lora failed (ConnectionError" in caplog.text
    assert "huggingface-cli upload me/tiny-lora" in caplog.text


def test_background_uploads_are_waited_for_before_the_run_ends(tmp_path):
    hub = FakeHub(delay=0.2)
    uploader = HubUploader(HubSettings("me/x", asynchronous=True), api=hub)
    for i in range(3):
        (tmp_path / f"{i}.bin").write_bytes(b"x")
        uploader.model_saved(tmp_path / f"{i}.bin")
    assert len(hub.calls) < 4  # still going
    uploader.close()
    assert [c[1] for c in hub.calls[1:]] == ["0.bin", "1.bin", "2.bin"]  # all of them, in order


@pytest.mark.parametrize("flags, needle", [
    (["--save_state_to_huggingface"], "--save_state_to_huggingface: needs --huggingface_repo_id"),
    (["--resume_from_huggingface"], "--resume_from_huggingface needs --resume"),
    (["--resume_from_huggingface", "--resume", "only-a-name"], "give {owner}/{repo}/{state folder}"),
])
def test_hub_flags_without_what_they_need_are_refused(workspace, flags, needle):
    with pytest.raises(SystemExit) as exited:
        run_script("train_network", args(workspace, "bad", *flags))
    assert needle in str(exited.value.code), exited.value.code


def test_resume_names_are_read_as_kohya_writes_them():
    assert parse_hub_state("me/repo/runs/a/lora-state") == parse_hub_state("me/repo/runs/a/lora-state:main:model")
    ref = parse_hub_state("me/repo/lora-state:v2:dataset")
    assert (ref.repo_id, ref.path_in_repo, ref.revision, ref.repo_type) == ("me/repo", "lora-state", "v2", "dataset")
    with pytest.raises(ValueError, match="repository type 'bucket'"):
        parse_hub_state("me/repo/s:main:bucket")


def test_an_unreachable_hub_says_what_to_do(tmp_path):
    def offline(*args, **kwargs):
        raise OSError("offline mode is enabled")
    with pytest.raises(ValueError, match="cannot be downloaded .*HF_HUB_OFFLINE must be unset"):
        download_state(parse_hub_state("me/repo/lora-state"), None, tmp_path, download=offline)


def test_resume_from_huggingface_continues_exactly(workspace, monkeypatch):
    """A state saved at step 2, fetched by (a stand-in for) snapshot_download, resumes to the uninterrupted run's
    LoRA, bit for bit."""
    import huggingface_hub

    root = workspace
    run_script("train_network", args(root, "straight", "--save_every_n_steps", "2", "--save_state"))

    def download(repo_id, *, repo_type, revision, token, local_dir, allow_patterns):
        assert (repo_id, repo_type, revision, allow_patterns) == ("me/repo", "model", "main", ["runs/lora-step00000002-state/*"])
        shutil.copytree(root / "straight" / "lora-step00000002-state", Path(local_dir) / "runs" / "lora-step00000002-state")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    run_script("train_network", args(root, "from_hub", "--save_every_n_steps", "2", "--save_state",
                                     "--resume_from_huggingface", "--resume", "me/repo/runs/lora-step00000002-state"))
    readers = [SafetensorsReader(root / run / "lora.safetensors") for run in ("straight", "from_hub")]
    with readers[0] as a, readers[1] as b:
        assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())
