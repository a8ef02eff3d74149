"""Recipe tests for train_db.py and fine_tune.py on a tiny model: golden losses, exact resume, class-image
generation, the fused backward pass, and the saved checkpoints read by diffusers in every format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from library.safetensors_io import SafetensorsReader

from tests.numerics import (CAPTIONS_LOST, FAMILY_CASE, assert_process_split_close, check_golden_losses,
                            golden_case_args, training_deviation)
from tests.recipe_helpers import assert_averaged_once, logged_losses, run_script as run, two_processes, with_batch



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("train_db")
    write_dataset(root / "data", images=4, size=64, seed=0, folder="2_sks shape")
    write_dataset(root / "reg", images=3, size=64, seed=1, folder="1_shape", prefix="shape, ")
    # fine-tune sources: kohya metadata JSON (stem keys) and a diffusers imagefolder with metadata.jsonl
    images = sorted((root / "data" / "2_sks shape").glob("*.png"))
    (root / "meta.json").write_text(json.dumps({p.stem: {"caption": f"sks shape number {i}", "tags": "red, blue"}
                                                for i, p in enumerate(images)}))
    folder = root / "imagefolder"
    folder.mkdir()
    lines = []
    for i, image in enumerate(images):
        shutil.copy(image, folder / image.name)
        lines.append(json.dumps({"file_name": image.name, "text": f"a drawing, number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert make_model(["--family", "sd1", str(root / "sd1.safetensors")]) == 0
    assert make_model(["--family", "sd2-768-v", str(root / "sd2v.safetensors")]) == 0
    return root


def common_args(root: Path, out: str, model: str = "sd1.safetensors") -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--output_dir", str(root / out),
            "--output_name", "model", "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
            "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--learning_rate", "1e-4", "--seed", "3",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--logging_dir", str(root / out / "logs")]


def db_args(root: Path, out: str, model: str = "sd1.safetensors") -> list[str]:
    return common_args(root, out, model) + ["--train_data_dir", str(root / "data")]


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with SafetensorsReader(path) as reader:
            return {k: reader.read(k) for k in reader.keys()}
    return torch.load(path, weights_only=True)["state_dict"]


CASES = {
    "db_prior_te_stop": ("train_db", ["--reg_data_dir", "{root}/reg", "--prior_loss_weight", "0.5",
                                      "--stop_text_encoder_training", "2", "--max_train_steps", "4",
                                      "--learning_rate_te", "5e-5"]),
    "db_no_prior_unet_only_cached": ("train_db", ["--stop_text_encoder_training", "-1", "--cache_latents",
                                                  "--max_train_steps", "3", "--optimizer_type", "AdamW8bit"]),
    "db_no_token_padding_flip": ("train_db", ["--no_token_padding", "--flip_aug", "--max_train_steps", "3",
                                              "--gradient_accumulation_steps", "2"]),
    "db_sd2v_te": ("train_db", ["--max_train_steps", "3"]),
    "ft_json": ("fine_tune", ["--train_data_dir", "{root}/data/2_sks shape", "--in_json", "{root}/meta.json",
                              "--max_train_steps", "3", "--dataset_repeats", "2"]),
    "ft_json_ema_te": ("fine_tune", ["--train_data_dir", "{root}/data/2_sks shape", "--in_json", "{root}/meta.json",
                                     "--max_train_steps", "3", "--use_ema", "--ema_decay", "0.9",
                                     "--train_text_encoder"]),
    "ft_imagefolder": ("fine_tune", ["--train_data_dir", "{root}/imagefolder", "--max_train_steps", "3",
                                     "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]),
}
# The option each case is there for (tests/golden/README.md: what removing it does to the losses).
COVERS = {
    "db_prior_te_stop": ["--prior_loss_weight", "0.5"],
    "db_no_prior_unet_only_cached": ["--cache_latents"],
    "db_no_token_padding_flip": ["--no_token_padding"],
    "db_sd2v_te": FAMILY_CASE,
    "ft_json": ["--dataset_repeats", "2"],
    "ft_json_ema_te": CAPTIONS_LOST,
    "ft_imagefolder": CAPTIONS_LOST,
}


@pytest.mark.numbers
@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, workspace):
    root = workspace
    script, extra = CASES[case]
    extra = golden_case_args(case, extra, COVERS)
    model = "sd2v.safetensors" if "sd2v" in case else "sd1.safetensors"
    base = db_args(root, f"golden_{case}", model) if script == "train_db" else common_args(root, f"golden_{case}")
    run(script, base + [a.replace("{root}", str(root)) for a in extra])
    losses = logged_losses(root / f"golden_{case}" / "logs")
    check_golden_losses("full_model_losses.json", case, losses)
    weights = file_tensors(root / f"golden_{case}" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    if script == "fine_tune":
        # fine_tune trains the text encoder only with --train_text_encoder (the losses of 3 steps can barely tell:
        # tests/golden/README.md); untrained, it is saved as it came in.
        base = file_tensors(root / "sd1.safetensors")
        te_changed = [k for k in base if k.startswith("cond_stage_model.") and not torch.equal(weights[k], base[k])]
        assert bool(te_changed) == ("--train_text_encoder" in extra), te_changed[:3]


def test_text_encoder_stops_training_at_the_step(workspace):
    """--stop_text_encoder_training 2: the text encoder changes in steps 1-2 only; -1: never; U-Net always."""
    root = workspace
    base = file_tensors(root / "sd1.safetensors")
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    unet = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    for steps in (2, 4):
        run("train_db", db_args(root, f"te_stop_{steps}") + ["--stop_text_encoder_training", "2",
                                                            "--max_train_steps", str(steps)])
    two, four = file_tensors(root / "te_stop_2" / "model.safetensors"), file_tensors(root / "te_stop_4" / "model.safetensors")
    assert not torch.equal(two[te], base[te]) and torch.equal(two[te], four[te])
    assert not torch.equal(two[unet], four[unet])
    run("train_db", db_args(root, "te_never") + ["--stop_text_encoder_training", "-1", "--max_train_steps", "2"])
    never = file_tensors(root / "te_never" / "model.safetensors")
    assert torch.equal(never[te], base[te]) and not torch.equal(never[unet], base[unet])


def test_resume_reproduces_the_uninterrupted_run(workspace):
    """Killed after 2 of 5 steps, resumed (TE stop at 3 and EMA in play), the checkpoint is bit-identical."""
    root = workspace
    extra = ["--reg_data_dir", str(root / "reg"), "--stop_text_encoder_training", "3", "--max_train_steps", "5",
             "--use_ema", "--ema_decay", "0.8", "--save_every_n_steps", "2", "--save_state"]
    run("train_db", db_args(root, "full") + extra)
    run("train_db", db_args(root, "part") + extra, stop_after=3)
    assert (root / "part" / "model-step00000002-state").is_dir() and not (root / "part" / "model.safetensors").exists()
    run("train_db", db_args(root, "part") + extra + ["--resume", str(root / "part" / "model-step00000002-state")])
    a, b = file_tensors(root / "full" / "model.safetensors"), file_tensors(root / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The final training states agree too, EMA included.
    sa, sb = (torch.load(root / run / "model-state" / "trainable.pt", weights_only=True) for run in ("full", "part"))
    assert sa["ema"]["num_updates"] == sb["ema"]["num_updates"] == 5
    assert all(torch.equal(x, y) for x, y in zip(sa["ema"]["shadow"], sb["ema"]["shadow"]))


def test_two_processes_match_one_process_at_the_same_global_batch(workspace):
    """accelerate launch with 2 CPU processes x batch 1 == 1 process x batch 2 for DreamBooth, with gradient
    accumulation: the whole U-Net and the text encoder train in one DDP wrapper; one SGD step moves every weight
    (a second one would measure float noise grown by the step more than the split: tests/numerics.py).
    --clip_skip 2 leaves the text encoder's last layer without gradients, so DDP looks for unused parameters after
    each forward; that layer stays exactly as loaded in both runs (SGD's weight decay would move a parameter handed
    a zero gradient instead of none). A third run stops the text encoder after step 1 of 2
    (--stop_text_encoder_training): its parameters drop out of DDP's reduction mid-run, and it ends as it was after
    step 1. Tolerance: PROCESS_SPLIT_REL."""
    root = workspace
    common = ["--save_every_n_steps", "1", "--gradient_accumulation_steps", "2", "--clip_skip", "2",
              "--optimizer_type", "SGD", "--optimizer_args", "weight_decay=0.01", "--learning_rate", "0.01",
              "--max_grad_norm", "0", "--save_model_as", "safetensors"]
    one_step = common + ["--max_train_steps", "1"]
    run("train_db", with_batch(db_args(root, "split_one") + one_step, 2))
    runs = two_processes([{"script": "train_db", "argv": with_batch(db_args(root, "split_two") + one_step, 1)},
                          {"script": "train_db", "argv": with_batch(db_args(root, "split_stop") + common + [
                              "--max_train_steps", "2", "--stop_text_encoder_training", "1"], 1)}])
    for communication, steps in zip(runs, (1, 2)):
        assert_averaged_once(communication, optimizer_steps=steps)
        assert communication["ddp_options"]["find_unused_parameters"] is True
    base = file_tensors(root / "sd1.safetensors")
    one, two, stop, stop_step1 = (file_tensors(root / out / name) for out, name in (
        ("split_one", "model.safetensors"), ("split_two", "model.safetensors"), ("split_stop", "model.safetensors"),
        ("split_stop", "model-step00000001.safetensors")))
    for part in ("model.diffusion_model.", "cond_stage_model."):
        keys = [k for k in one if k.startswith(part) and one[k].is_floating_point()]
        assert_process_split_close(training_deviation(*({k: d[k] for k in keys} for d in (two, one, base))),
                                   what=f"train_db {part}")
    layers = "cond_stage_model.transformer.text_model.encoder.layers."
    last = max(int(k[len(layers):].split(".")[0]) for k in base if k.startswith(layers))
    last_layer = [k for k in base if k.startswith(f"{layers}{last}.")]
    assert last_layer and all(torch.equal(w[k], base[k]) for w in (one, two) for k in last_layer)
    text_encoder = [k for k in stop if k.startswith("cond_stage_model.")]
    assert all(torch.equal(stop[k], stop_step1[k]) for k in text_encoder)
    assert not all(torch.equal(stop_step1[k], base[k]) for k in text_encoder)


def test_ema_weights_are_saved(workspace):
    """With --use_ema the file holds the EMA (checked against the state's EMA tensors), not the raw weights."""
    root = workspace
    run("train_db", db_args(root, "ema") + ["--max_train_steps", "3", "--use_ema", "--ema_decay", "0.5",
                                            "--stop_text_encoder_training", "-1", "--save_state_on_train_end"])
    state = torch.load(root / "ema" / "model-state" / "trainable.pt", weights_only=True)
    raw_unet, shadow = state["models"]["unet"], state["ema"]["shadow"]
    saved = file_tensors(root / "ema" / "model.safetensors")
    key = "model.diffusion_model.out.2.weight"  # conv_out.weight; the EMA follows the U-Net's parameter order
    index = list(raw_unet).index("conv_out.weight")  # (the U-Net has no buffers: state order = parameter order)
    assert len(shadow) == len(raw_unet)
    assert torch.equal(saved[key], shadow[index]) and not torch.equal(saved[key], raw_unet["conv_out.weight"])


def test_fused_backward_pass_equals_the_normal_step(workspace):
    root = workspace
    extra = ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
             "warmup_init=False", "--max_train_steps", "3", "--max_grad_norm", "0", "--stop_text_encoder_training",
             "-1", "--train_batch_size", "1"]
    run("train_db", db_args(root, "unfused") + extra)
    run("train_db", db_args(root, "fused") + extra + ["--fused_backward_pass"])
    a, b = file_tensors(root / "unfused" / "model.safetensors"), file_tensors(root / "fused" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(root / "unfused" / "logs") == logged_losses(root / "fused" / "logs")


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "diffusers", "diffusers_safetensors"])
def test_saved_checkpoint_loads_in_diffusers(fmt, workspace, tmp_path):
    """Every format: diffusers reads the trained weights exactly (vs the live modules' state), and single files
    have the WebUI key layout of the base model."""
    from diffusers import StableDiffusionPipeline

    from library.checkpoint_writer import write_config_folder
    from library.sd_checkpoint import read_checkpoint

    root = workspace
    out = f"fmt_{fmt}"
    run("train_db", db_args(root, out) + ["--max_train_steps", "2", "--save_model_as", fmt,
                                          "--save_state_on_train_end"])
    trained = torch.load(root / out / "model-state" / "trainable.pt", weights_only=True)["models"]
    path = root / out / ("model" if fmt.startswith("diffusers") else f"model.{fmt}")
    if fmt.startswith("diffusers"):
        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
        assert (path / "unet" / ("diffusion_pytorch_model.safetensors" if fmt == "diffusers_safetensors"
                                 else "diffusion_pytorch_model.bin")).is_file()
    else:
        with read_checkpoint(root / "sd1.safetensors") as base:
            write_config_folder(base, tmp_path / "config")
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tmp_path / "config"),
                                                        local_files_only=True)
        assert file_tensors(path).keys() == file_tensors(root / "sd1.safetensors").keys()
    for component in ("unet", "text_encoder"):
        loaded = getattr(pipe, component).state_dict()
        for key, value in trained[component].items():
            if key != "embeddings.position_ids":
                assert torch.equal(loaded[key], value), f"{component}.{key}"
    with read_checkpoint(root / "sd1.safetensors") as base:  # the VAE is the base model's, untouched
        assert all(torch.equal(pipe.vae.state_dict()[k], v.load()) for k, v in base.tensors["vae"].items())


def test_checkpoint_metadata(workspace):
    root = workspace
    run("train_db", db_args(root, "meta") + ["--max_train_steps", "2", "--reg_data_dir", str(root / "reg")])
    with SafetensorsReader(root / "meta" / "model.safetensors") as reader:
        meta = reader.metadata
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.title"] == "model"
    assert meta["ss_training_script"] == "train_db" and meta["ss_steps"] == "2" and meta["ss_seed"] == "3"
    assert meta["ss_num_train_images"] == "4" and meta["ss_num_reg_images"] == "3"
    assert json.loads(meta["ss_tag_frequency"])  # per-folder tag counts, as in LoRA files


# ----------------------------------------------------------------------------------------------------------
# Class images


def test_class_image_generation_count_determinism_and_resume(workspace, tmp_path):
    import numpy as np
    from PIL import Image

    from library.class_images import generate_class_images, plan_class_images
    from library.model_loading import instantiate_models
    from library.prompt_files import SamplePrompt
    from library.sd_checkpoint import read_checkpoint

    with read_checkpoint(workspace / "sd1.safetensors") as checkpoint:
        models = instantiate_models(checkpoint)
    prompt = SamplePrompt("shape", width=64, height=64, steps=2)

    def make(reg: Path, count: int, batch: int) -> list[Path]:
        plan = plan_class_images(reg, "shape", count)
        return generate_class_images(plan, prompt=prompt, models=models, sampler_name="ddim", seed=5,
                                     batch_size=batch)

    full = make(tmp_path / "a", 5, 1)
    assert [p.name for p in full] == [f"class_{i:05d}.png" for i in range(5)] and full[0].parent.name == "1_shape"
    # Interrupted after 2, then resumed: the same 5 images.
    assert len(make(tmp_path / "b", 2, 1)) == 2
    assert len(make(tmp_path / "b", 5, 1)) == 3 and make(tmp_path / "b", 5, 1) == []
    pixels = lambda p: np.asarray(Image.open(p))  # noqa: E731
    for path in full:
        assert np.array_equal(pixels(path), pixels(tmp_path / "b" / "1_shape" / path.name))
    # Batched generation makes the same images (each from its own seed), up to float reduction order.
    batched = make(tmp_path / "c", 5, 3)
    for a, b in zip(full, batched):
        assert np.abs(pixels(a).astype(int) - pixels(b).astype(int)).max() <= 2
    # Images already in an existing class folder count (any name).
    (tmp_path / "d" / "3_shape").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "d" / "3_shape" / "mine.jpg")
    plan = plan_class_images(tmp_path / "d", "shape", 3)
    assert plan.folder.name == "3_shape" and plan.existing == 1 and plan.to_generate == [0, 1]


def test_train_db_generates_class_images_then_trains_with_them(workspace):
    root = workspace
    reg = root / "generated_reg"
    run("train_db", db_args(root, "class_run") + ["--reg_data_dir", str(reg), "--class_prompt", "shape",
                                                  "--num_class_images", "2", "--class_image_steps", "2",
                                                  "--max_train_steps", "1"])
    assert sorted(p.name for p in (reg / "1_shape").iterdir()) == ["class_00000.png", "class_00001.png"]
    with SafetensorsReader(root / "class_run" / "model.safetensors") as reader:
        assert reader.metadata["ss_num_reg_images"] == "2"


def test_source_extras_and_format_carried_over(workspace, tmp_path):
    """SD 2.x: the original-only tensors (last text layer, text_projection) come back unchanged in the WebUI
    layout; a .ckpt base saves as .ckpt and a diffusers folder as a folder by default; a source EMA is dropped."""
    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.sd_checkpoint import FamilyHints, read_checkpoint
    from library.tensor_files import LazyTensor

    root = workspace
    run("train_db", db_args(root, "sd2_extras", "sd2v.safetensors") + ["--max_train_steps", "1"])
    base, out = file_tensors(root / "sd2v.safetensors"), file_tensors(root / "sd2_extras" / "model.safetensors")
    assert out.keys() == base.keys()
    extras = [k for k in base if "resblocks.23" in k or k.endswith("text_projection")]
    assert extras and all(torch.equal(out[k], base[k]) for k in extras)

    with read_checkpoint(root / "sd1.safetensors") as checkpoint:
        checkpoint.extras["model_ema.decay"] = LazyTensor.of(torch.tensor(0.9999))  # a stale EMA in the source
        save_checkpoint(checkpoint, tmp_path / "base.ckpt", SaveFormat.CKPT)
        save_checkpoint(checkpoint, tmp_path / "base_diffusers", SaveFormat.DIFFUSERS_SAFETENSORS)
    for source, expected in (("base.ckpt", "model.ckpt"), ("base_diffusers", "model")):
        argv = db_args(root, f"default_fmt_{expected}") + ["--max_train_steps", "1"]
        argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / source)
        run("train_db", argv)
        assert (root / f"default_fmt_{expected}" / expected).exists()
    saved = torch.load(root / "default_fmt_model.ckpt" / "model.ckpt", weights_only=True)
    assert "model_ema.decay" not in saved["state_dict"] and saved["global_step"] == 1
    with read_checkpoint(root / "default_fmt_model" / "model", FamilyHints()) as checkpoint:
        assert checkpoint.family.name == "sd1"


def test_diffusers_saves_rotate_with_their_states_and_samples_are_drawn(workspace):
    """--save_last_n_steps with diffusers folders (no suffix) prunes old folders and their states; sample images
    are drawn from the model being trained."""
    root = workspace
    prompts = root / "db_prompts.txt"
    prompts.write_text("sks shape --s 2\n")
    run("train_db", db_args(root, "rotate") + ["--max_train_steps", "4", "--save_model_as", "diffusers_safetensors",
                                              "--save_every_n_steps", "1", "--save_last_n_steps", "1",
                                              "--save_state", "--sample_prompts", str(prompts),
                                              "--sample_every_n_steps", "2"])
    names = sorted(p.name for p in (root / "rotate").iterdir() if p.name not in ("logs", "sample"))
    assert names == ["model", "model-state", "model-step00000002", "model-step00000002-state",
                     "model-step00000003", "model-step00000003-state"]
    assert len(list((root / "rotate" / "sample").glob("model_00000[24]_00_*.png"))) == 2


# bf16 runs on a CPU keep every bucket at least 64 px wide. A 32 px wide bucket makes the tiny U-Net's last
# downsampling convolution see a 1 px wide input, where oneDNN 3.12's AVX-512 bf16 backward-weights kernels
# (jit_bf16:avx512_core_bf16, also under ONEDNN_MAX_CPU_ISA=AVX512_CORE; iw1 kw3 sw2 pw1) now and then return NaN
# from finite inputs (an AMD EPYC with AVX512_BF16: about 1 in 20 random trials; fp32, and AVX2 kernels, never). Real training sizes
# (latents of 32+ px) never reach 1 px there; the loop would stop on the non-finite gradient with an error.
BF16_ON_CPU_BUCKETS = ["--min_bucket_reso", "64"]


def test_full_bf16_trains_half_precision_weights(workspace):
    root = workspace
    run("train_db", db_args(root, "bf16") + BF16_ON_CPU_BUCKETS + [
                                            "--max_train_steps", "2", "--mixed_precision", "bf16", "--full_bf16",
                                            "--learning_rate", "5e-3",  # bf16 steps of 1e-4 may round away
                                            "--stop_text_encoder_training", "-1", "--save_precision", "float"])
    base, out = file_tensors(root / "sd1.safetensors"), file_tensors(root / "bf16" / "model.safetensors")
    key = "model.diffusion_model.out.2.weight"
    assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all()
    assert not torch.equal(out[key], base[key])
    assert torch.equal(out[key], out[key].bfloat16().float())  # trained in bf16: every value is a bf16 value


def test_saved_epoch_is_the_epoch_in_the_file_name(workspace):
    """ss_epoch counts completed epochs as kohya does: an epoch save says the number in its file name; the final
    save counts a last, partial epoch too (kohya's num_train_epochs). 4 images x 2 repeats, batch 2: 4 steps an
    epoch, so 6 steps end half-way through epoch 2."""
    root = workspace
    run("train_db", db_args(root, "epochs") + ["--max_train_steps", "6", "--save_every_n_epochs", "1",
                                              "--stop_text_encoder_training", "-1"])
    saved = {p.name: SafetensorsReader(p).metadata for p in (root / "epochs").glob("*.safetensors")}
    assert {name: (m["ss_epoch"], m["ss_steps"]) for name, m in saved.items()} == {
        "model-000001.safetensors": ("1", "4"), "model.safetensors": ("2", "6")}


def test_half_precision_run_saves_untrained_components_exactly(workspace):
    """bf16 holds the frozen text encoder and VAE in bf16 for compute; the saved model still carries the base
    model's own tensors for what nothing trained (bit-identical, fp32 as asked), and the trained ones as trained."""
    root = workspace
    ft_args = ["--train_data_dir", str(root / "data" / "2_sks shape"), "--in_json", str(root / "meta.json"),
               "--max_train_steps", "2", "--mixed_precision", "bf16", "--save_precision", "float"]
    run("fine_tune", common_args(root, "ft_bf16") + BF16_ON_CPU_BUCKETS + ft_args)
    run("train_db", db_args(root, "db_bf16") + BF16_ON_CPU_BUCKETS + ["--max_train_steps", "2", "--mixed_precision", "bf16",
                                               "--save_precision", "float", "--stop_text_encoder_training", "1"])
    base = file_tensors(root / "sd1.safetensors")

    def changed(out: dict[str, torch.Tensor], prefix: str) -> int:
        keys = [k for k in base if k.startswith(prefix)]
        assert keys and all(out[k].dtype == torch.float32 for k in keys)
        return sum(not torch.equal(out[k], base[k]) for k in keys)

    fine_tuned, dreambooth = file_tensors(root / "ft_bf16" / "model.safetensors"), \
        file_tensors(root / "db_bf16" / "model.safetensors")
    assert changed(fine_tuned, "cond_stage_model.") == 0 and changed(fine_tuned, "first_stage_model.") == 0
    assert changed(fine_tuned, "model.diffusion_model.") > 0
    # train_db trained the text encoder for a step: it is saved as trained; the VAE never trains.
    assert changed(dreambooth, "cond_stage_model.") > 0 and changed(dreambooth, "first_stage_model.") == 0


def test_untrained_components_keep_the_held_weights_when_the_source_changed(tiny_checkpoints, caplog):
    """The source is read again at save time: if it no longer holds what was loaded (the file was replaced during
    the run), the held weights are saved rather than a foreign model's, with a warning."""
    from dataclasses import replace

    from library.full_finetune import take_untrained_from_source
    from library.model_loading import checkpoint_from_models, instantiate_models
    from library.tensor_files import LazyTensor

    source = tiny_checkpoints["sd1"]
    held = checkpoint_from_models(instantiate_models(source, dtype=torch.bfloat16))
    exact = replace(held, tensors=dict(held.tensors))
    take_untrained_from_source(exact, source, ["vae", "text_encoder"])
    for component in ("vae", "text_encoder"):
        assert all(torch.equal(exact.tensors[component][k].load(), v.load())
                   for k, v in source.tensors[component].items())
        assert all(v.dtype == torch.float32 for v in exact.tensors[component].values())

    key = next(iter(source.tensors["vae"]))
    changed_vae = dict(source.tensors["vae"], **{key: LazyTensor.of(source.tensors["vae"][key].load() + 1)})
    changed = replace(source, tensors=dict(source.tensors, vae=changed_vae))
    kept = replace(held, tensors=dict(held.tensors))
    take_untrained_from_source(kept, changed, ["vae", "text_encoder"])
    assert kept.tensors["vae"] is held.tensors["vae"] and "not what was loaded" in caplog.text
    assert kept.tensors["text_encoder"]["encoder.layers.0.mlp.fc1.weight"].dtype == torch.float32
