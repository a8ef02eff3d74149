"""The latent and text-encoder caches filled by 2 processes of one `accelerate launch` (CPU, gloo;
library/cache_split.py): each process encodes about half, the cache files are the bytes 1 process writes, every
process then holds every entry, and training on the caches equals the 1-process run.

One 1-process pass (in this process) fills both disk caches with the tools; the files are kept as the reference.
Before the 2-process launch one image's entries are left valid, one image's are made stale and the rest deleted,
so the launch shows reuse, recomputation and the split at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from library.safetensors_io import SafetensorsReader, save_tensors
from tests.ddp_probe import entry_digest
from tests.numerics import assert_process_split_close, training_deviation
from tests.recipe_helpers import logged_losses, run_script, tiny_workspace, two_processes, with_batch

FOLDER = "2_sks shape"
IMAGES = 18
# Captions: 16 distinct, and images 16 and 17 repeat those of 0 and 1 (one caption, several files).
DISTINCT_CAPTIONS = 16


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tiny_workspace(tmp_path_factory.mktemp("cache_split"), images=IMAGES, folder=FOLDER)
    for i in range(IMAGES):  # the synthetic captions repeat (colour x shape): give each its own, but two
        (root / "data" / FOLDER / f"{i:03d}.caption").write_text(f"sks shape, picture {i % DISTINCT_CAPTIONS}\n")
    return root


def data_flags(root: Path) -> list[str]:
    """The dataset as the tools and the trainer see it: one bucket, so the global batches are full (with_batch)."""
    return ["--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
            "--resolution", "64", "--flip_aug"]


def train_args(root: Path, out: str, *caches: str) -> list[str]:
    """train_network.py on the caches, 2 SGD steps with gradient accumulation, a save after each."""
    return with_batch(data_flags(root) + [
        "--output_dir", str(root / out), "--output_name", "lora", "--logging_dir", str(root / out / "logs"),
        "--network_dim", "4", "--network_alpha", "2", "--network_train_unet_only", *caches, "--max_train_steps", "2",
        "--save_every_n_steps", "1", "--gradient_accumulation_steps", "2", "--optimizer_type", "SGD",
        "--learning_rate", "0.01", "--max_grad_norm", "0", "--seed", "7", "--train_batch_size", "2",
        "--max_data_loader_n_workers", "0"], 1)


DISK = ("--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk")
MEMORY = ("--cache_latents", "--cache_text_encoder_outputs")


def cache_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "data" / FOLDER).glob("*.safetensors"))}


def read_tensors(data: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsReader(data) as reader:
        return {k: reader.read(k) for k in reader.keys()}, dict(reader.metadata)


def read_lora(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path)[0]


def make_stale(path: Path) -> None:
    """The same tensors under a key that no longer matches (as after a change of VAE or text encoder)."""
    tensors, metadata = read_tensors(path)
    key = json.loads(metadata["cache_key"])
    save_tensors(path, tensors, {"cache_key": json.dumps({**key, "version": -1})})


def test_two_processes_fill_the_caches_as_one_process_does(workspace):
    root = workspace
    folder = root / "data" / FOLDER
    run_script("tools.cache_latents", data_flags(root))
    run_script("tools.cache_text_encoder_outputs", data_flags(root) + ["--text_encoder_batch_size", "2"])
    reference = cache_files(root)
    assert len(reference) == 2 * IMAGES
    run_script("train_network", with_batch(train_args(root, "one_process", *DISK), 2))

    # 000: valid (reused), 001: stale (recomputed), the rest missing.
    for name in reference:
        if name.startswith("001_"):
            make_stale(folder / name)
        elif not name.startswith("000_"):
            (folder / name).unlink()
    tool_argv = data_flags(root)
    runs = two_processes([{"script": "tools.cache_latents", "argv": tool_argv},
                          {"script": "tools.cache_text_encoder_outputs",
                           "argv": tool_argv + ["--text_encoder_batch_size", "2"]},
                          {"script": "train_network", "argv": train_args(root, "disk", *DISK)},
                          {"script": "train_network", "argv": train_args(root, "memory", *MEMORY)}])
    assert cache_files(root) == reference  # written by 2 processes, bit for bit; the stale one rewritten

    (latent_tool,), (text_tool,) = (runs[0]["caches"], runs[1]["caches"])
    # 17 images to encode at --vae_batch_size 1: 9 + 8. 15 captions (picture 0 was read from 000's file), in
    # chunks of 2: 4 chunks each, 8 + 7 captions; 016's file (picture 0 again) is written from the read entry.
    assert latent_tool["encoded"] == [9, 8] and text_tool["encoded"] == [8, 7]
    # Read from disk by the training run, every entry valid: nothing encoded.
    assert [c["encoded"] for c in runs[2]["caches"]] == [[0, 0], [0, 0]]
    # In memory: every entry encoded once, by one of the two (18 latents 9 + 9; 16 captions in 2 chunks of 8), and
    # both processes hold the whole cache, the same bytes as the 1-process files.
    latents, text = runs[3]["caches"]
    assert latents["encoded"] == [9, 9] and text["encoded"] == [8, 8]
    want_latents, want_text = {}, {}
    for name in reference:
        tensors, metadata = read_tensors(folder / name)
        if name.endswith("_sd_latents.safetensors"):
            want_latents[name] = entry_digest(tensors)
        else:
            want_text[json.loads(metadata["cache_key"])["caption"]] = entry_digest(tensors)
    for digests, want in ((latents["digests"], want_latents), (text["digests"], want_text)):
        assert digests[0] == digests[1] == want
    assert len(want_text) == DISTINCT_CAPTIONS

    # Training on the split caches: as 1 process x batch 2 within PROCESS_SPLIT_REL (the 2-process parity test's
    # tolerance and reason: tests/numerics.py), and from the in-memory caches exactly as from the disk ones.
    one, one_step1, disk, memory = (read_lora(root / out / name) for out, name in (
        ("one_process", "lora.safetensors"), ("one_process", "lora-step00000001.safetensors"),
        ("disk", "lora.safetensors"), ("memory", "lora.safetensors")))
    trained = [k for k in one if k.endswith(("lora_up.weight", "lora_down.weight"))]
    assert_process_split_close(training_deviation(*({k: d[k] for k in trained} for d in (disk, one, one_step1))),
                               what="train_network on caches filled by 2 processes")
    assert logged_losses(root / "disk" / "logs") == pytest.approx(logged_losses(root / "one_process" / "logs"),
                                                                  rel=1e-5)
    assert memory.keys() == disk.keys() and all(torch.equal(memory[k], disk[k]) for k in disk)


# ------------------------------------------------------------------------ the collectives, in 2 spawned processes


def _share_worker(rank: int, port: int, folder: str, results: str) -> None:
    """One of 2 gloo processes (torch.multiprocessing.spawn): ProcessShare's collectives, and a latent cache whose
    disk entries each process keeps in a folder of its own (a machine with its own copy of the dataset)."""
    import datetime

    import torch.distributed as dist

    from diffusers import AutoencoderKL

    from library.cache_split import CacheShareError, ProcessShare
    from library.families import SD1, ModelSize
    from library.latent_cache import CacheSettings, LatentCache
    from tests.test_latent_cache import make_dataset

    # A collective that waits for a process that will never come fails in a minute, not gloo's 30.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    share, out = ProcessShare(count=2, index=rank), {}
    out["agreed"] = share.agreed({"b"} if rank == 0 else {"c", "a"}, ["a", "b", "c", "d"])
    batches = [[0], [1], [2], [3], [4]]
    out["mine"] = share.mine(batches)
    received = {}
    for entries in share.exchange_rounds(share.mine(batches), lambda batch: {b: b * 10 for b in batch}):
        received.update(entries)
    out["received"] = sorted(received.items())

    def work():
        if rank == 1:
            raise FloatingPointError("NaN in VAE latents")
        return "done"

    try:
        out["together"] = share.run_together(work)
    except (CacheShareError, FloatingPointError) as e:
        out["together"] = f"{type(e).__name__}: {e}"

    torch.manual_seed(5)  # the same VAE in both processes (only its VAE: a whole tiny model takes seconds more)
    vae = AutoencoderKL.from_config(SD1.configs(ModelSize.TINY).vae).eval()
    own = Path(folder) / f"machine{rank}"
    own.mkdir()
    LatentCache.disk_path = staticmethod(lambda item: own / f"{item.record.path.stem}_sd_latents.safetensors")
    for to_disk in (True, False):
        cache = LatentCache(vae, CacheSettings(to_disk=to_disk))
        dataset = make_dataset(Path(folder) / "images")
        try:
            cache.build(dataset, share)
            out[f"to_disk={to_disk}"] = [cache.encoded, sorted(entry_digest({"latents": cache.get(item, False)})
                                                               for item in dataset.items)]
        except ValueError as e:
            out[f"to_disk={to_disk}"] = str(e)
    Path(results, f"{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_the_processes_agree_exchange_and_stop_together(tmp_path):
    """ProcessShare in 2 gloo processes: the union of what each found missing, in dataset order; the batches dealt
    k mod 2 and exchanged round by round (3 and 2 batches: the process with fewer still takes part in every round);
    a share that fails on one process stops the other with that process named, instead of leaving it waiting in
    the next collective. A disk cache whose entries a process cannot read back (each keeps them in a folder of its
    own, as machines with their own copies of the dataset do) stops both, naming the file and the ways out; the
    same cache in memory is shared through the process group and both hold all 4 latents."""
    import socket

    import torch.multiprocessing as mp
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)]):
        Image.new("RGB", (64, 64), colour).save(tmp_path / "images" / f"{i}.png")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_share_worker, args=(port, str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    out = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]

    assert out[0]["agreed"] == out[1]["agreed"] == ["a", "b", "c"]
    assert [o["mine"] for o in out] == [[[0], [2], [4]], [[1], [3]]]
    assert [o["received"] for o in out] == [[[1, 10], [3, 30]], [[0, 0], [2, 20], [4, 40]]]
    assert out[0]["together"] == ("CacheShareError: process 1 of 2 failed while filling the cache, so this one "
                                  "stops too: FloatingPointError: NaN in VAE latents")
    assert out[1]["together"] == "FloatingPointError: NaN in VAE latents"
    for o in out:
        assert "not every process can read it back" in o["to_disk=True"]
        assert "tools/cache_latents.py, one process per machine" in o["to_disk=True"]
    assert out[0]["to_disk=True"] == out[1]["to_disk=True"]
    (encoded0, held0), (encoded1, held1) = out[0]["to_disk=False"], out[1]["to_disk=False"]
    assert (encoded0, encoded1) == (2, 2) and held0 == held1 and len(set(held0)) == 4
