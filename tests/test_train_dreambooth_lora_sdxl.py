"""diffusers' train_dreambooth_lora_sdxl.py interface: its flags translated onto sdxl_train_network.py (checked
value by value), a run on the tiny SDXL model with its file names and outputs (pytorch_lora_weights.safetensors
loaded by `load_lora_weights(output_dir)`, the kohya copy, generated class images, validation samples), golden
losses, and the example's flags that cannot work here refused by name.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.numerics import (FP32_OUTPUT_REL, assert_outputs_close, check_golden_losses, golden_case_args,
                            relative_deviation)
from tests.recipe_helpers import logged_losses, run_script


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("dreambooth_lora_sdxl")
    write_dataset(root, images=4, size=96, seed=0, folder="cttoy", prefix="A photo of the front of a cttoy, ")
    write_dataset(root, images=4, size=96, seed=0, folder="cttoy_hf", prefix="A photo of the front of a cttoy, ",
                  imagefolder=True)
    assert make_model(["--family", "sdxl", str(root / "sdxl.safetensors")]) == 0
    return root


def example_args(root: Path, out: str, *, instance: bool = True) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "sdxl.safetensors"),
            *(["--instance_data_dir", str(root / "cttoy")] if instance else []),
            "--instance_prompt", "a photo of cttoy", "--output_dir", str(root / out),
            "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "3", "--checkpointing_steps", "2",
            "--learning_rate", "1e-3", "--seed", "5"]


def parse(argv: list[str]):
    import train_dreambooth_lora_sdxl as script

    return script.setup_parser().parse_args(argv)


def translated(root: Path, extra: list[str], *, instance: bool = True) -> tuple[dict, dict]:
    """The sdxl_train_network.py arguments the example's flags become, and the dataset TOML written for them."""
    import sdxl_train_network
    import train_dreambooth_lora_sdxl as script
    from library import train_args

    ex = parse(example_args(root, "translate", instance=instance) + extra)
    args = train_args.parse_args(sdxl_train_network.setup_parser(), script.translate(ex))
    return vars(args), tomllib.loads(Path(args.dataset_config).read_text())


def test_flags_translate_value_by_value(workspace):
    args, dataset = translated(workspace, ["--rank", "8", "--scale_lr", "--gradient_accumulation_steps", "3",
                                           "--checkpoints_total_limit", "3", "--random_flip", "--snr_gamma", "5",
                                           "--use_8bit_adam", "--adam_weight_decay", "0.01", "--lr_scheduler",
                                           "cosine", "--lr_warmup_steps", "7", "--with_prior_preservation",
                                           "--class_data_dir", str(workspace / "class"), "--class_prompt",
                                           "a photo of a toy", "--prior_loss_weight", "0.5", "--report_to", "all"])
    assert (args["network_dim"], args["network_alpha"]) == (8, 8.0)  # alpha = rank: diffusers' scale 1
    assert args["learning_rate"] == args["unet_lr"] == pytest.approx(1e-3 * 3 * 2)  # x accumulation x batch
    assert args["network_train_unet_only"] and args["text_encoder_lr"] is None
    assert (args["save_every_n_steps"], args["save_state"], args["save_last_n_steps"]) == (2, True, 4)
    assert (args["min_snr_gamma"], args["optimizer_type"], args["lr_scheduler"], args["lr_warmup_steps"]) == \
        (5.0, "AdamW8bit", "cosine", "7")  # kohya's --lr_warmup_steps is text: steps, a ratio or N%
    assert "weight_decay=0.01" in args["optimizer_args"] and args["prior_loss_weight"] == 0.5
    assert args["save_lora_format"] == ["diffusers"] and args["output_name"] == "pytorch_lora_weights"
    assert args["log_with"] == "all" and args["logging_dir"] == str(workspace / "translate" / "logs")
    general, (group,) = dataset["general"], dataset["datasets"]
    assert (general["resolution"], general["batch_size"], general["flip_aug"], general["random_crop"]) == \
        (64, 2, True, True)
    instance, prior = group["subsets"]
    assert instance == {"image_dir": str(workspace / "cttoy"), "class_tokens": "a photo of cttoy", "num_repeats": 1}
    assert prior == {"image_dir": str(workspace / "class"), "class_tokens": "a photo of a toy", "is_reg": True}

    args, dataset = translated(workspace, ["--train_text_encoder", "--center_crop", "--output_kohya_format"])
    assert args["text_encoder_lr"] == [5e-6] and not args["network_train_unet_only"]
    assert args["lr_warmup_steps"] in (None, "0")  # diffusers' "constant" ignores the example's default 500
    assert args["save_lora_format"] == ["diffusers", "kohya"] and dataset["general"]["random_crop"] is False


CASES = {"prior_random_crop": ["--with_prior_preservation", "--class_data_dir", "{root}/class", "--class_prompt",
                               "a photo of a toy", "--num_class_images", "2", "--prior_loss_weight", "0.5"]}
COVERS = {"prior_random_crop": ["--prior_loss_weight", "0.5"]}


@pytest.mark.numbers
def test_run_writes_the_examples_files(workspace):
    """One run with prior preservation: 2 class images generated into --class_data_dir, the LoRA in diffusers'
    layout as output_dir/pytorch_lora_weights.safetensors (loaded without a weight_name) and kohya's copy beside it,
    both giving the same pipeline outputs; validation samples; golden losses."""
    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint
    from tests.test_sdxl_lora import diffusers_sdxl_pipeline, outputs

    root = workspace
    case = "prior_random_crop"
    extra = [a.replace("{root}", str(root)) for a in golden_case_args(case, CASES[case], COVERS)]
    run_script("train_dreambooth_lora_sdxl", example_args(root, "run") + extra + [
        "--output_kohya_format", "--train_text_encoder", "--text_encoder_lr", "1e-2", "--validation_prompt",
        "a cttoy on a table",
        "--num_validation_images", "2", "--validation_epochs", "1", "--max_train_steps", "4"])  # one whole epoch
    check_golden_losses("train_dreambooth_lora_sdxl_losses.json", case, logged_losses(root / "run" / "logs"))
    out = root / "run"
    assert sorted(p.name for p in (root / "class").glob("*.png")) == ["class_00000.png", "class_00001.png"]
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "pytorch_lora_weights_kohya.safetensors").is_file()
    assert len(list((out / "sample").glob("*.png"))) == 2  # 2 validation seeds after the one epoch
    with read_checkpoint(root / "sdxl.safetensors") as checkpoint:
        models = instantiate_models(checkpoint)
    reference = outputs(models)
    results = []
    for weight_name in (None, "pytorch_lora_weights_kohya.safetensors"):
        pipe = diffusers_sdxl_pipeline(models)
        pipe.load_lora_weights(str(out), **({"weight_name": weight_name} if weight_name else {}))
        results.append(outputs(models, unet=pipe.unet, text_encoders=[pipe.text_encoder, pipe.text_encoder_2]))
    for i, (diffusers_layout, kohya, base) in enumerate(zip(*results, reference)):
        assert relative_deviation(kohya, base) > 10 * FP32_OUTPUT_REL, f"output {i}: the LoRA changes nothing"
        assert_outputs_close(diffusers_layout, kohya, what=f"pytorch_lora_weights vs the kohya copy, output {i}")


def test_local_imagefolder_dataset_with_captions(workspace):
    """--dataset_name: a local imagefolder (metadata.jsonl); --caption_column text gives each image its caption."""
    hf = ["--dataset_name", str(workspace / "cttoy_hf"), "--caption_column", "text"]
    _, dataset = translated(workspace, hf, instance=False)
    subset = dataset["datasets"][0]["subsets"][0]
    assert subset["metadata_file"] == str(workspace / "cttoy_hf" / "metadata.jsonl") and subset["caption_column"] == "text"
    run_script("train_dreambooth_lora_sdxl", example_args(workspace, "hf", instance=False) + hf)
    assert (workspace / "hf" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("flags,needles", [
    (["--use_dora"], ["--use_dora: DoRA is not implemented"]),
    (["--push_to_hub", "--variant", "fp16"], ["--variant:", "--push_to_hub: nothing is uploaded"]),
    (["--with_prior_preservation"], ["--with_prior_preservation needs --class_data_dir and --class_prompt"]),
    (["--optimizer", "lion"], ["--optimizer lion", "AdamW and prodigy"]),
])
def test_flags_that_cannot_work_are_refused_by_name(workspace, flags, needles):
    with pytest.raises(SystemExit) as info:
        run_script("train_dreambooth_lora_sdxl", example_args(workspace, "refused") + flags)
    message = str(info.value.code)
    for needle in needles:
        assert needle in message, message
    assert not list((workspace / "refused").glob("*.safetensors"))
