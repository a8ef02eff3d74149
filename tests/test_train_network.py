"""Recipe tests: run the real train_network.py on a tiny model and synthetic images.

Golden losses pin the numbers (a change in data order, noise, loss or optimizer shows up here); resume tests
prove that stopping and resuming (twice) ends with weights identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from library.safetensors_io import SafetensorsReader

from tests.numerics import (CACHE_MIXES_IMAGES, FAMILY_CASE, FP32_OUTPUT_REL, PROCESS_SPLIT_REL, assert_outputs_close,
                            assert_process_split_close, check_golden_losses, golden_case_args, relative_deviation,
                            training_deviation)
from tests.recipe_helpers import (assert_averaged_once, logged_losses, one_and_two_processes, run_script, two_machines,
                                  two_processes, with_batch)


def run(argv: list[str], stop_after: int | None = None) -> None:
    run_script("train_network", argv, stop_after)




@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("train_network")
    write_dataset(root / "data", images=6, size=64, seed=0, folder="3_sks shape")
    write_dataset(root / "reg", images=4, size=64, seed=1, folder="1_shape", prefix="shape, ")
    from PIL import Image

    (root / "masks").mkdir()
    for image in (root / "data" / "3_sks shape").glob("*.png"):
        size = Image.open(image).size
        mask = Image.new("RGB", size, (0, 0, 0))
        mask.paste((255, 255, 255), (0, 0, size[0] // 2, size[1]))  # learn the left half only
        mask.save(root / "masks" / image.name)
    assert make_model(["--family", "sd1", str(root / "sd1.safetensors")]) == 0
    assert make_model(["--family", "sd2-768-v", str(root / "sd2v.safetensors")]) == 0
    return root


def base_args(root: Path, out: str, model: str = "sd1.safetensors") -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "lora", "--resolution", "64", "--enable_bucket",
            "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--seed", "7",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--logging_dir", str(root / out / "logs")]


def read_lora(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}


CASES = {
    "sd1_cached": ["--cache_latents", "--max_train_steps", "6"],
    "sd1_uncached_reg_flip_accum": ["--reg_data_dir", "{root}/reg", "--flip_aug", "--gradient_accumulation_steps", "2",
                                    "--max_train_steps", "4", "--shuffle_caption", "--keep_tokens", "1",
                                    "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"],
    "sd1_locon_minsnr_offset": ["--cache_latents", "--network_args", "conv_dim=4", "conv_alpha=1", "--min_snr_gamma",
                                "5", "--noise_offset", "0.05", "--max_train_steps", "4", "--optimizer_type",
                                "AdamW8bit"],
    "sd2v_unet_only": ["--cache_latents", "--network_train_unet_only", "--max_train_steps", "4"],
    "sd1_masked_loss_cached": ["--masked_loss", "--conditioning_data_dir", "{root}/masks", "--cache_latents",
                               "--max_train_steps", "3"],
    "sd1_weighted_color_long": ["--weighted_captions", "--caption_prefix", "(sks:1.3)", "--color_aug",
                                "--max_token_length", "150", "--clip_skip", "2", "--max_train_steps", "3"],
    # The network types act on the losses only through their updates: at 1e-3 a LoRA-FA, DyLoRA or OFT run's losses
    # stay within 0.3 % of a LoRA's, so these two train at high rates (see tests/golden/README.md; LoRA-FA has no
    # case). DyLoRA at 1e-1 drifted 2.4 % under the AVX2 kernels; at 5e-2 with unit=1 (ranks 1-4 drawn, the most
    # unlike a LoRA) it needs 10 steps to move 11.8x its tolerance, and spreads 5e-4 across kernels (tolerance 1e-2).
    "sd1_dylora_high_lr": ["--cache_latents", "--max_train_steps", "10", "--learning_rate", "5e-2",
                           "--network_module", "networks.dylora", "--network_args", "unit=1"],
    "sd1_oft_high_lr": ["--cache_latents", "--max_train_steps", "5", "--learning_rate", "1e-1",
                        "--network_train_unet_only", "--network_module", "networks.oft", "--network_alpha", "1e-2"],
}
# The option each case is there for (tests/golden/README.md: what removing it does to the losses).
COVERS = {
    "sd1_cached": CACHE_MIXES_IMAGES,
    "sd1_uncached_reg_flip_accum": ["--gradient_accumulation_steps", "2"],
    "sd1_locon_minsnr_offset": ["--min_snr_gamma", "5"],
    "sd2v_unet_only": FAMILY_CASE,
    "sd1_masked_loss_cached": ["--masked_loss", "--conditioning_data_dir", "{root}/masks"],
    "sd1_weighted_color_long": ["--weighted_captions"],
    "sd1_dylora_high_lr": ["--network_module", "networks.dylora", "--network_args", "unit=1"],
    "sd1_oft_high_lr": ["--network_module", "networks.oft", "--network_alpha", "1e-2"],
}


@pytest.mark.numbers
@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, workspace):
    root = workspace
    model = "sd2v.safetensors" if case.startswith("sd2v") else "sd1.safetensors"
    extra = [a.replace("{root}", str(root)) for a in golden_case_args(case, CASES[case], COVERS)]
    run(base_args(root, f"golden_{case}", model) + extra)
    losses = logged_losses(root / f"golden_{case}" / "logs")
    lora = read_lora(root / f"golden_{case}" / "lora.safetensors")
    check_golden_losses("train_network_losses.json", case, losses)
    assert all(torch.isfinite(t).all() for t in lora.values())
    if "unet_only" in case:
        assert not any(k.startswith("lora_te_") for k in lora)


def test_resume_reproduces_the_uninterrupted_run(workspace):
    root = workspace
    common = ["--cache_latents", "--max_train_steps", "7", "--save_every_n_steps", "2", "--save_state",
              "--flip_aug", "--shuffle_caption", "--lr_scheduler", "cosine"]
    run(base_args(root, "straight") + common)
    straight = read_lora(root / "straight" / "lora.safetensors")

    # Killed after step 2 (state saved at step 2), resumed, killed again after 2 more steps, resumed to the end.
    out = root / "resumed"
    run(base_args(root, "resumed") + common, stop_after=2)
    assert (out / "lora-step00000002-state").is_dir() and not (out / "lora.safetensors").exists()
    run(base_args(root, "resumed") + common + ["--resume", str(out / "lora-step00000002-state")], stop_after=2)
    state = json.loads((out / "lora-step00000004-state" / "train_state.json").read_text())
    assert state["global_step"] == 4
    run(base_args(root, "resumed") + common + ["--resume", str(out / "lora-step00000004-state")])
    resumed = read_lora(out / "lora.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    # The resumed run's losses continue the straight run's, step for step.
    assert logged_losses(out / "logs") == logged_losses(root / "straight" / "logs")


def test_resume_refuses_a_state_from_another_configuration(workspace):
    root = workspace
    common = ["--cache_latents", "--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state"]
    run(base_args(root, "cfg_a") + common)
    with pytest.raises(SystemExit, match="different run configuration.*network_dim"):
        run(base_args(root, "cfg_b") + common[:-3] + ["--network_dim", "8", "--resume",
                                                      str(root / "cfg_a" / "lora-step00000001-state")])


@pytest.mark.numbers
@pytest.mark.parametrize("network_args", [[], ["--network_args", "conv_dim=4", "conv_alpha=1"]])
def test_trained_lora_gives_the_same_outputs_in_diffusers(workspace, network_args):
    """The file train_network.py writes, loaded by diffusers' load_lora_weights, computes what our network
    computed in training (U-Net and text encoder, fp32)."""
    from diffusers import StableDiffusionPipeline

    import networks.lora as lora
    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint

    root = workspace
    out = f"to_diffusers_{len(network_args)}"
    # A high learning rate, so the trained LoRA changes the outputs by far more than the comparison's tolerance.
    run(base_args(root, out) + ["--cache_latents", "--max_train_steps", "3", "--learning_rate", "1e-2"] + network_args)
    lora_file = root / out / "lora.safetensors"
    with read_checkpoint(root / "sd1.safetensors") as checkpoint:
        models = instantiate_models(checkpoint)
        folder = save_checkpoint(checkpoint, root / out / "base_diffusers", SaveFormat.DIFFUSERS_SAFETENSORS)
    network, weights = lora.create_network_from_weights(1.0, str(lora_file), None, models.text_encoder, models.unet)
    network.apply_to(models.text_encoder, models.unet)
    network.load_weights(lora_file)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.load_lora_weights(str(root / out), weight_name="lora.safetensors")
    ids = models.tokenizer(["sks shape, red circle"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_te, theirs_te = models.text_encoder(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state
        assert_outputs_close(ours_te, theirs_te, what="text encoder + trained LoRA: diffusers vs ours")
        ours = models.unet(latents, 300, ours_te).sample
        theirs = pipe.unet(latents, 300, ours_te).sample
        assert_outputs_close(ours, theirs, what="U-Net + trained LoRA: diffusers vs ours")
        # ...and the LoRA really changes the model, by far more than the tolerance (the comparison is not vacuous).
        network.restore()
        assert relative_deviation(models.unet(latents, 300, ours_te).sample, ours) > 10 * FP32_OUTPUT_REL


def test_data_loader_workers_do_not_change_the_result(workspace):
    """Samples are addressed by (epoch, step, index): loading them in worker processes gives the same run."""
    root = workspace
    common = ["--max_train_steps", "3", "--flip_aug", "--shuffle_caption", "--random_crop"]
    results = {}
    for workers in ("0", "2"):
        argv = base_args(root, f"workers_{workers}") + common
        argv[argv.index("--max_data_loader_n_workers") + 1] = workers
        run(argv)
        results[workers] = read_lora(root / f"workers_{workers}" / "lora.safetensors")
    assert all(torch.equal(results["0"][k], results["2"][k]) for k in results["0"])


def test_sample_images_during_training(workspace):
    from PIL import Image

    root = workspace
    prompts = root / "prompts.txt"
    prompts.write_text("sks shape, red circle --d 3 --s 3\nsks shape --s 2 --ss euler_a --w 96\n")
    run(base_args(root, "samples") + ["--cache_latents", "--max_train_steps", "4", "--sample_prompts", str(prompts),
                                      "--sample_every_n_steps", "2", "--sample_at_first", "--sample_sampler", "ddim"])
    files = sorted(p.name for p in (root / "samples" / "sample").iterdir())
    # At first (step 0), after step 2 and after step 4; two prompts each; the seed ends the name.
    assert len(files) == 6
    assert sum(f.startswith("lora_000000_00_") and f.endswith("_3.png") for f in files) == 1
    assert sum(f.startswith("lora_000004_01_") for f in files) == 1
    image = Image.open(next((root / "samples" / "sample").glob("lora_000002_01_*.png")))
    assert image.size == (96, 64) and "Sampler: euler_a" in image.text["parameters"]
    # Sampling does not change training: the weights equal a run without samples.
    run(base_args(root, "no_samples") + ["--cache_latents", "--max_train_steps", "4"])
    a, b = read_lora(root / "samples" / "lora.safetensors"), read_lora(root / "no_samples" / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def wandb_history(wandb_dir: Path) -> list[dict]:
    """The logged rows of the one offline wandb run under `wandb_dir`, read from its record file without wandb's
    reader: a ":W&B" header, then LevelDB-log framed (crc32, length, type) protobuf `Record`s in 32 KiB blocks."""
    import time

    (path,) = wandb_dir.glob("*/wandb/offline-run-*/run-*.wandb")  # <logging_dir>/<timestamp>/wandb/...
    # wandb's writer is a separate process: on a loaded machine it may still be flushing after finish() returns.
    # Its last record is the run's "exit"; wait for it (a minute at most) before reading.
    for _ in range(120):
        rows, kinds = _wandb_records(path)
        if "exit" in kinds:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"{path}: the wandb run never finished writing (records: {sorted(kinds)})")


def _wandb_records(path: Path) -> tuple[list[dict], set[str]]:
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows, kinds = 7, 32768, b"", [], set()
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            kinds.add(record.WhichOneof("record_type"))
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows, kinds


def test_wandb_and_tensorboard_log_the_same_losses(workspace, monkeypatch):
    root = workspace
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    prompts = root / "wandb_prompts.txt"
    prompts.write_text("sks shape --s 2\n")
    run(base_args(root, "wandb") + ["--cache_latents", "--max_train_steps", "3", "--log_with", "all",
                                    "--log_tracker_name", "my_project", "--wandb_run_name", "first try",
                                    "--sample_prompts", str(prompts), "--sample_every_n_steps", "3"])
    rows = wandb_history(root / "wandb" / "logs")
    wandb_losses = [row["loss/current"] for row in rows if "loss/current" in row]
    assert wandb_losses == logged_losses(root / "wandb" / "logs") and len(wandb_losses) == 3
    assert [row["_step"] for row in rows] == [1, 2, 3]
    assert rows[-1]["sample/00/_type"] == "image-file"  # the step-3 sample image, in the same row
    assert any(name.startswith("lr/") for name in rows[0])


# One run as 1 process x batch 2 and as 2 processes x batch 1 (one_and_two_processes sets the batch), with gradient
# accumulation, 2 SGD steps (the first moves only lora_up, which starts at zero; the second every LoRA weight), a save
# after each.
SPLIT_ARGS = ["--cache_latents", "--max_train_steps", "2", "--save_every_n_steps", "1", "--gradient_accumulation_steps",
              "2", "--flip_aug", "--shuffle_caption", "--optimizer_type", "SGD", "--learning_rate", "0.01",
              "--max_grad_norm", "0"]


def split_deviations(root: Path, got: str, want: str) -> dict[str, float]:
    """`training_deviation` of run `got`'s LoRA from run `want`'s, for the U-Net and the text-encoder part."""
    one, one_step1 = (read_lora(root / want / name) for name in ("lora.safetensors", "lora-step00000001.safetensors"))
    two = read_lora(root / got / "lora.safetensors")
    deviations = {}
    for part in ("lora_unet_", "lora_te_"):
        keys = [k for k in one if k.startswith(part) and k.endswith(("lora_up.weight", "lora_down.weight"))]
        deviations[part] = training_deviation(*({k: d[k] for k in keys} for d in (two, one, one_step1)))
    return deviations


def test_two_processes_match_one_process_at_the_same_global_batch(workspace):
    """accelerate launch with 2 CPU processes (gloo) x batch 1 == 1 process x batch 2, with gradient accumulation
    and the text encoder's LoRA training: the same samples, noise and timesteps (losses equal to float precision),
    and DDP's average of the gradients is the batch-2 gradient (the trained weights agree: PROCESS_SPLIT_REL; what a
    fault does: the next test). DDP averaged every trained value once per optimizer step, inside the backward pass."""
    root = workspace
    communication = one_and_two_processes("train_network", base_args(root, "one_process") + SPLIT_ARGS,
                                          base_args(root, "two_processes") + SPLIT_ARGS)
    assert_averaged_once(communication, optimizer_steps=2)
    assert communication["ddp_options"]["find_unused_parameters"] is False  # SD 1.x conditions on the last layer
    for part, deviation in split_deviations(root, "two_processes", "one_process").items():
        assert_process_split_close(deviation, what=f"train_network {part}")
    assert logged_losses(root / "two_processes" / "logs") == pytest.approx(
        logged_losses(root / "one_process" / "logs"), rel=1e-5)
    one, two = (read_lora(root / run / "lora-step00000001.safetensors") for run in ("one_process", "two_processes"))
    downs = [k for k in one if k.endswith("lora_down.weight")]
    assert all(torch.equal(one[k], two[k]) for k in downs)  # the same initialisation, unmoved by the first step


def test_a_fault_in_the_gradient_averaging_is_far_outside_the_tolerance(workspace):
    """The comparison above fails, by far, when DDP's averaging is planted with a fault (tests/ddp_probe.py): the
    gradients summed instead of averaged, divided by the process count twice, or not communicated at all (each
    process stepping with its own). Each moves the weights by more than 10x PROCESS_SPLIT_REL (measured: 25x and
    more), in the U-Net's LoRA and in the text encoder's."""
    root = workspace
    one = base_args(root, "one_process") + SPLIT_ARGS
    if not (root / "one_process" / "lora.safetensors").exists():  # (written by the test above when it ran)
        run(with_batch(one, 2))
    faults = ("sum", "twice", "local")
    two_processes([{"script": "train_network", "argv": with_batch(base_args(root, f"fault_{fault}") + SPLIT_ARGS, 1),
                    "fault": fault} for fault in faults])
    for fault in faults:
        deviations = split_deviations(root, f"fault_{fault}", "one_process")
        assert all(d > 10 * PROCESS_SPLIT_REL for d in deviations.values()), (fault, deviations)


def test_two_machines_train_together_as_one_process(workspace):
    """Two "machines" on this host: two `accelerate launch --num_machines 2 --machine_rank 0/1 --main_process_ip
    127.0.0.1` of one process each (gloo) train together as 2 processes of one launch do: equal to 1 process x batch
    2 within PROCESS_SPLIT_REL (the same computation; only how the processes meet differs), DDP averaging every
    trained value once per optimizer step. Only the main process writes: machine 1 is given its own output and
    logging folders, and nothing is written there. Then both resume from the state machine 0 saved after step 1
    (machine 1 reads it from machine 0's folder, as from shared storage) and end with the uninterrupted run's
    weights, bit for bit. A run without --seed trains with machine 0's seed on both."""
    root = workspace
    one = base_args(root, "one_process") + SPLIT_ARGS
    if not (root / "one_process" / "lora.safetensors").exists():  # (written by the 2-process test when it ran)
        run(with_batch(one, 2))
    state = root / "machine0" / "lora-step00000001-state"

    def both_machines(out: str, extra: list[str]) -> list[dict]:
        """The same run on machine 0 and machine 1, each writing (if at all) into its own folder <out>0 / <out>1."""
        return [{"script": "train_network", "argv": with_batch(base_args(root, f"{out}{m}") + SPLIT_ARGS + extra, 1)}
                for m in (0, 1)]

    straight = both_machines("machine", ["--save_state"])
    resumed = both_machines("resumed_machine", ["--resume", str(state)])
    unseeded = both_machines("unseeded_machine", ["--max_train_steps", "1"])
    for run_ in unseeded:
        seed = run_["argv"].index("--seed")
        del run_["argv"][seed:seed + 2]
    runs = two_machines([straight[0], resumed[0], unseeded[0]], [straight[1], resumed[1], unseeded[1]])
    assert_averaged_once(runs[0], optimizer_steps=2)
    assert_averaged_once(runs[1], optimizer_steps=1)
    assert runs[0]["seeds"] == [7, 7]
    # Without --seed each process draws one; machine 0's is used everywhere (one data order, one noise per slot).
    assert runs[2]["seeds"][0] == runs[2]["seeds"][1]
    for part, deviation in split_deviations(root, "machine0", "one_process").items():
        assert_process_split_close(deviation, what=f"train_network on two machines {part}")
    assert logged_losses(root / "machine0" / "logs") == pytest.approx(logged_losses(root / "one_process" / "logs"),
                                                                       rel=1e-5)
    assert (root / "machine0" / "lora-step00000001.safetensors").exists() and state.is_dir()
    for out in ("machine1", "resumed_machine1"):
        assert [p for p in (root / out).rglob("*") if not p.is_dir()] == [], out
    want, got = (read_lora(root / out / "lora.safetensors") for out in ("machine0", "resumed_machine0"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_two_processes_resume_exactly(workspace):
    """2 processes, killed after step 2 and resumed from its state, end with the weights and losses (training and
    validation: each process evaluates its share of the held-out batches through the DDP-prepared model, without
    gradients) of the uninterrupted 2-process run, bit for bit. Run with kohya's --ddp_static_graph and
    --ddp_gradient_as_bucket_view (DDP built with both), and --ddp_timeout."""
    root = workspace
    common = ["--cache_latents", "--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state", "--flip_aug",
              "--shuffle_caption", "--lr_scheduler", "cosine", "--validation_split", "0.34",
              "--validate_every_n_steps", "1", "--ddp_static_graph", "--ddp_gradient_as_bucket_view",
              "--ddp_timeout", "10"]
    straight, resumed = (with_batch(base_args(root, out) + common, 1) for out in ("ddp_straight", "ddp_resumed"))
    state = root / "ddp_resumed" / "lora-step00000002-state"
    runs = two_processes([{"script": "train_network", "argv": straight},
                          {"script": "train_network", "argv": resumed, "stop_after": 2},
                          {"script": "train_network", "argv": resumed + ["--resume", str(state)]}])
    for communication, steps in zip(runs, (4, 2, 2)):
        assert_averaged_once(communication, optimizer_steps=steps, validations=steps)
        assert communication["ddp_options"] == {"find_unused_parameters": False, "static_graph": True,
                                                "gradient_as_bucket_view": True}
    want, got = (read_lora(root / out / "lora.safetensors") for out in ("ddp_straight", "ddp_resumed"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert logged_losses(root / "ddp_resumed" / "logs") == logged_losses(root / "ddp_straight" / "logs")
    validation = [logged_losses(root / out / "logs", "loss/validation/step_average")
                  for out in ("ddp_straight", "ddp_resumed")]
    assert len(validation[0]) == 4 and validation[1] == validation[0]


def test_dataset_config_and_metadata_sources(workspace):
    """--dataset_config with two datasets (multi-resolution), and a fine-tune --in_json dataset, both train."""
    root = workspace
    config = root / "datasets.toml"
    config.write_text(f"""
[general]
caption_extension = ".caption"
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{root / 'data' / '3_sks shape'}"
  num_repeats = 2
[[datasets]]
resolution = [96, 64]
batch_size = 1
  [[datasets.subsets]]
  image_dir = "{root / 'reg' / '1_shape'}"
  class_tokens = "shape"
""")
    argv = base_args(root, "toml_run") + ["--cache_latents_to_disk", "--max_train_steps", "3", "--dataset_config",
                                           str(config)]
    run(argv)
    meta = json.loads(SafetensorsReader(root / "toml_run" / "lora.safetensors").metadata["ss_datasets"])
    assert [d["resolution"] for d in meta] == [[64, 64], [96, 64]]
    # Disk cache entries are named by bucket (so one image at two resolutions keeps two files).
    cached = [p.name for p in (root / "reg" / "1_shape").glob("*_sd_latents.safetensors")]
    assert len(cached) == 4 and all(re.fullmatch(r"\d{3}_\d+x\d+_sd_latents.safetensors", n) for n in cached)

    metadata = root / "meta.json"
    metadata.write_text(json.dumps({p.stem: {"caption": "sks shape", "tags": "red"}
                                    for p in (root / "data" / "3_sks shape").glob("*.png")}))
    argv = base_args(root, "json_run") + ["--cache_latents", "--max_train_steps", "2", "--in_json", str(metadata)]
    argv[argv.index("--train_data_dir") + 1] = str(root / "data" / "3_sks shape")
    run(argv)
    assert (root / "json_run" / "lora.safetensors").exists()


def test_kohya_extras_scale_weight_norms_base_weights_bf16_and_hashes(workspace):
    import hashlib

    import safetensors.torch

    root = workspace
    run(base_args(root, "norms") + ["--cache_latents", "--max_train_steps", "3", "--scale_weight_norms", "0.05",
                                    "--learning_rate", "5e-2"])
    lora_file = root / "norms" / "lora.safetensors"
    weights = read_lora(lora_file)
    # Every module's delta W (with alpha / rank) respects the max norm after the last step.
    for key in [k for k in weights if k.endswith("lora_down.weight")]:
        up, down = weights[key.replace("lora_down", "lora_up")], weights[key]
        alpha = weights[key.replace("lora_down.weight", "alpha")]
        delta = up.flatten(1) @ down.flatten(1) if down.ndim == 2 else None
        if delta is not None:
            assert (delta * alpha / down.shape[0]).norm() <= 0.05 * (1 + 1e-4), key
    events = logged_losses(root / "norms" / "logs")
    assert len(events) == 3

    # sshs hashes equal sd-webui-additional-networks' definition, recomputed independently from the file.
    reader = SafetensorsReader(lora_file)
    ss_only = {k: v for k, v in reader.metadata.items() if k.startswith("ss_")}
    serialized = safetensors.torch.save(weights, ss_only)
    header = int.from_bytes(serialized[:8], "little")
    assert reader.metadata["sshs_model_hash"] == hashlib.sha256(serialized[8 + header:]).hexdigest()
    assert reader.metadata["sshs_legacy_hash"] == hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8]

    # --base_weights merges a LoRA into the base first: same seed, different losses than without it.
    run(base_args(root, "based") + ["--cache_latents", "--max_train_steps", "2", "--base_weights", str(lora_file),
                                    "--base_weights_multiplier", "1.0"])
    run(base_args(root, "unbased") + ["--cache_latents", "--max_train_steps", "2"])
    assert logged_losses(root / "based" / "logs") != logged_losses(root / "unbased" / "logs")

    # --full_bf16 with bf16 mixed precision trains the network in bf16.
    run(base_args(root, "bf16") + ["--cache_latents", "--max_train_steps", "2", "--mixed_precision", "bf16",
                                   "--full_bf16"])
    with SafetensorsReader(root / "bf16" / "lora.safetensors") as r:
        assert r.info("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight").dtype == torch.bfloat16


def test_external_network_module_lycoris(workspace):
    """kohya's --network_module interface with LyCORIS; text-encoder names get the `text_model` level that
    transformers 5 dropped, so the file loads in WebUI / ComfyUI / diffusers."""
    pytest.importorskip("lycoris.kohya")
    from diffusers import StableDiffusionPipeline

    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.sd_checkpoint import read_checkpoint

    root = workspace
    run(base_args(root, "lycoris") + ["--cache_latents", "--max_train_steps", "2", "--network_module",
                                      "lycoris.kohya", "--network_args", "algo=locon", "preset=attn-mlp"])
    weights = read_lora(root / "lycoris" / "lora.safetensors")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in weights
    with read_checkpoint(root / "sd1.safetensors") as checkpoint:
        folder = save_checkpoint(checkpoint, root / "lycoris" / "base", SaveFormat.DIFFUSERS_SAFETENSORS)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    ids = pipe.tokenizer(["sks shape"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids).last_hidden_state
        pipe.load_lora_weights(str(root / "lycoris"), weight_name="lora.safetensors")
        after = pipe.text_encoder(ids).last_hidden_state
    assert (after - before).abs().max() > 1e-6  # the text-encoder part was found and applied


def initial_network(module_name: str, *args, **kwargs) -> dict[str, torch.Tensor]:
    """The network train_network.py starts from with base_args' --seed 7: it seeds torch's generator just before
    create_network, and the initial weights depend on the model's structure only."""
    import importlib

    from library.families import FAMILIES
    from library.tiny_models import build_tiny_models

    models = build_tiny_models(FAMILIES["sd1"])
    torch.manual_seed(7)
    network = importlib.import_module(module_name).create_network(1.0, *args, None, models.text_encoder, models.unet,
                                                                  **kwargs)
    return {k: v.clone() for k, v in network.state_dict().items()}


def logged_scalars(log_root: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next(p for p in log_root.iterdir() if p.is_dir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_lora_fa_trains_the_up_matrices_and_keeps_the_down_ones_bit_identical(workspace):
    """--network_module networks.lora_fa: a plain LoRA file (networks.lora's keys) whose down matrices are exactly
    their initial values after training, and whose up matrices all trained."""
    root = workspace
    run(base_args(root, "lora_fa") + ["--cache_latents", "--max_train_steps", "3", "--network_module",
                                      "networks.lora_fa"])
    trained = read_lora(root / "lora_fa" / "lora.safetensors")
    initial = initial_network("networks.lora_fa", 4, 2)
    assert trained.keys() == initial.keys()
    downs = [k for k in initial if k.endswith("lora_down.weight")]
    assert downs and all(torch.equal(trained[k], initial[k]) for k in downs)
    ups = [k for k in initial if k.endswith("lora_up.weight")]
    assert all(trained[k].abs().max() > 0 and not initial[k].any() for k in ups)
    with SafetensorsReader(root / "lora_fa" / "lora.safetensors") as reader:
        assert reader.metadata["ss_network_module"] == "networks.lora_fa"


def test_dylora_trains_only_the_units_of_the_ranks_drawn(workspace):
    """--network_module networks.dylora: each step's rank is logged (dylora/rank); after the run, the units of
    ranks that were drawn have trained and every other unit (rows of down, columns of up) is bit-identical to its
    initial value: a unit above the drawn rank takes no part in the step, one below it is frozen."""
    root = workspace
    run(base_args(root, "dylora") + ["--cache_latents", "--max_train_steps", "2", "--network_module", "networks.dylora",
                                     "--network_dim", "8", "--network_args", "unit=2"])
    ranks = logged_scalars(root / "dylora" / "logs", "dylora/rank")
    assert len(ranks) == 2 and all(r in (2, 4, 6, 8) for r in ranks)
    drawn = {int(r) // 2 - 1 for r in ranks}
    trained = read_lora(root / "dylora" / "lora.safetensors")
    initial = initial_network("networks.dylora", 8, 2, unit="2")
    assert trained.keys() == initial.keys()
    for key in (k for k in initial if k.endswith("lora_down.weight")):
        up_key = key.replace("lora_down", "lora_up")
        for unit in range(4):
            rows = slice(2 * unit, 2 * unit + 2)
            untouched = torch.equal(trained[key][rows], initial[key][rows]) and \
                torch.equal(trained[up_key][:, rows], initial[up_key][:, rows])
            assert untouched == (unit not in drawn), (key, unit, drawn)
    with SafetensorsReader(root / "dylora" / "lora.safetensors") as reader:
        assert json.loads(reader.metadata["ss_network_args"]) == {"unit": "2"}


def test_dylora_with_two_processes_trains_what_one_process_trains(workspace):
    """DyLoRA through DDP: both processes draw each step's rank from the run seed, DDP is told that the other units
    get no gradient (find_unused_parameters) and leaves their gradients unset, so SGD with weight decay (which moves
    any parameter given a gradient, even a zero one) leaves them bit-identical to their initial values, as in one
    process; the trained units agree with the one-process run (PROCESS_SPLIT_REL)."""
    root = workspace
    dylora = SPLIT_ARGS + ["--optimizer_args", "weight_decay=0.1", "--network_module", "networks.dylora",
                           "--network_dim", "8", "--network_args", "unit=2"]
    communication = one_and_two_processes("train_network", base_args(root, "dylora_one") + dylora,
                                          base_args(root, "dylora_two") + dylora)
    assert communication["ddp_options"]["find_unused_parameters"] is True
    for part, deviation in split_deviations(root, "dylora_two", "dylora_one").items():
        assert_process_split_close(deviation, what=f"train_network DyLoRA {part}")
    drawn = {int(r) // 2 - 1 for r in logged_scalars(root / "dylora_one" / "logs", "dylora/rank")}
    assert drawn != {0, 1, 2, 3}  # 2 steps: some unit was never drawn
    initial = initial_network("networks.dylora", 8, 2, unit="2")
    for run_name in ("dylora_one", "dylora_two"):
        trained = read_lora(root / run_name / "lora.safetensors")
        for key in (k for k in initial if k.endswith("lora_down.weight")):
            up_key = key.replace("lora_down", "lora_up")
            for unit in set(range(4)) - drawn:
                rows = slice(2 * unit, 2 * unit + 2)
                assert torch.equal(trained[key][rows], initial[key][rows]), (run_name, key, unit)
                assert torch.equal(trained[up_key][:, rows], initial[up_key][:, rows]), (run_name, up_key, unit)


@pytest.mark.numbers
def test_oft_learns_orthogonal_rotations_within_the_constraint(workspace):
    """--network_module networks.oft (kohya's command line, text encoder not excluded: OFT has no modules there):
    kohya's keys, and every learned rotation orthogonal with |Q| at the constraint alpha * out, which the updates
    overshot (the stored blocks' own |B - Bᵀ| is larger: the clamp acted in training)."""
    from library.families import FAMILIES
    from library.tiny_models import build_tiny_models
    from networks import oft

    root = workspace
    run(base_args(root, "oft") + ["--cache_latents", "--max_train_steps", "2", "--network_module", "networks.oft",
                                  "--network_alpha", "1e-3", "--learning_rate", "1e-2"])
    path = root / "oft" / "lora.safetensors"
    trained = read_lora(path)
    assert trained and all(k.startswith("oft_unet_") and k.endswith((".oft_blocks", ".alpha")) for k in trained)
    with SafetensorsReader(path) as reader:
        assert (reader.metadata["ss_network_module"], reader.metadata["ss_network_dim"]) == ("networks.oft", "4")
    models = build_tiny_models(FAMILIES["sd1"])
    network, weights = oft.create_network_from_weights(1.0, str(path), None, models.text_encoder, models.unet)
    network.load_state_dict(weights)
    for module in network.loras:
        r = module.rotation()
        # fp32 solves of 8 x 8 / 16 x 16 blocks: 9e-7 measured (tests/test_network_types.py)
        assert (r.transpose(1, 2) @ r - torch.eye(module.block_size)).abs().max() <= 1e-5
        raw = (module.oft_blocks - module.oft_blocks.transpose(1, 2)).norm().item()
        assert raw > module.constraint
        assert abs(module.skew().norm().item() / module.constraint - 1) <= 1e-5


def test_debug_dataset_shows_samples_and_trains_nothing(workspace, capsys):
    root = workspace
    run(base_args(root, "debug") + ["--debug_dataset", "--shuffle_caption", "--flip_aug"])
    out = capsys.readouterr().out
    assert "bucket" in out and "caption: '" in out and "flip=" in out
    assert not (root / "debug" / "lora.safetensors").exists()


def test_saved_epoch_is_the_epoch_in_the_file_name(workspace):
    """ss_epoch counts completed epochs (kohya): an epoch save says the number in its file name, the final save the
    total; a step save says the epochs completed before it, and ss_steps the step."""
    root = workspace
    run(base_args(root, "epochs") + ["--cache_latents", "--max_train_epochs", "3", "--save_every_n_epochs", "1",
                                     "--save_every_n_steps", "4"])
    out = root / "epochs"
    saved = {p.name: SafetensorsReader(p).metadata for p in out.glob("*.safetensors")}
    steps_per_epoch = int(saved["lora.safetensors"]["ss_steps"]) // 3
    assert steps_per_epoch > 4  # so the step save at step 4 falls inside the first epoch
    assert {name: (m["ss_epoch"], m["ss_steps"]) for name, m in saved.items() if "step" not in name} == {
        "lora-000001.safetensors": ("1", str(steps_per_epoch)),
        "lora-000002.safetensors": ("2", str(2 * steps_per_epoch)),
        "lora.safetensors": ("3", str(3 * steps_per_epoch))}
    assert (saved["lora-step00000004.safetensors"]["ss_epoch"], saved["lora-step00000004.safetensors"]["ss_steps"]) \
        == ("0", "4")


def test_save_n_epoch_ratio_and_state_retention_apart_from_the_models(workspace):
    """kohya's --save_n_epoch_ratio N saves every floor(epochs / N) epochs (winning over --save_every_n_epochs);
    --save_last_n_epochs_state / --save_last_n_steps_state keep fewer states than model files."""
    root = workspace
    run(base_args(root, "ratio") + ["--cache_latents", "--max_train_epochs", "4", "--save_n_epoch_ratio", "2",
                                    "--save_every_n_epochs", "1", "--save_state", "--save_last_n_epochs", "5",
                                    "--save_last_n_epochs_state", "0"])
    names = sorted(p.name for p in (root / "ratio").iterdir() if p.name != "logs")
    assert names == ["lora-000002.safetensors", "lora-state", "lora.safetensors"]  # every 2nd epoch; no epoch state

    run(base_args(root, "states") + ["--cache_latents", "--max_train_steps", "5", "--save_every_n_steps", "1",
                                     "--save_state", "--save_last_n_steps", "10", "--save_last_n_steps_state", "1"])
    names = sorted(p.name for p in (root / "states").iterdir() if p.name != "logs")
    assert names == sorted(["lora-state", "lora-step00000001.safetensors", "lora-step00000002.safetensors",
                            "lora-step00000003.safetensors", "lora-step00000003-state",
                            "lora-step00000004.safetensors", "lora-step00000004-state", "lora.safetensors"])
