"""ControlNet training pieces: the ControlNet as a `TrainingTask` (U-Net + ControlNet prediction, saving both
layouts) and validation images made with diffusers' ControlNet pipeline.

The base model stays frozen; only the ControlNet trains. Its residuals are added to the frozen U-Net's skip
connections, exactly as `StableDiffusionControlNetPipeline` does at inference, so what is trained is what is used.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

SAVE_LAYOUTS = ("both", "safetensors", "diffusers")  # --save_model_as: single file and/or diffusers folder


class ControlNetTask:
    def __init__(self, controlnet, unet, *, family, save_as: str, save_dtype, metadata: dict[str, str]):
        self.controlnet, self.unet, self.family = controlnet, unet, family
        self.save_as, self.save_dtype, self.metadata = save_as, save_dtype, metadata
        self.train_text_encoder = False
        # The ControlNet's full weights while a sharding engine (FSDP) saves ({"controlnet": state dict}, set by the
        # Trainer on the main process around a save; the module then holds only this process's share).
        self.gathered_weights: dict[str, dict[str, torch.Tensor]] | None = None

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """What FSDP shards: the ControlNet (the frozen U-Net stays whole on every process)."""
        return {"controlnet": self.controlnet}

    def _weights(self) -> dict[str, torch.Tensor]:
        gathered = (self.gathered_weights or {}).get("controlnet")
        return self.controlnet.state_dict() if gathered is None else gathered

    def denoise(self, noisy_latents, timesteps, text_conditioning, batch):
        control = batch["control"].to(noisy_latents.device, self.controlnet.dtype)
        down, mid = self.controlnet(noisy_latents.to(self.controlnet.dtype), timesteps,
                                    **text_conditioning.to(self.controlnet.dtype).unet_kwargs(),
                                    controlnet_cond=control, return_dict=False)
        dtype = self.unet.dtype
        return self.unet(noisy_latents, timesteps, **text_conditioning.unet_kwargs(),
                         down_block_additional_residuals=[d.to(dtype) for d in down],
                         mid_block_additional_residual=mid.to(dtype)).sample

    def trainable_state(self) -> dict:
        # {"models": {name: state dict}}, as the full-model tasks': what FSDP's resume loads into the shards.
        return {"models": {"controlnet": {k: v.detach() for k, v in self._weights().items()}}}

    def load_trainable_state(self, state: dict) -> None:
        # A state written before the ControlNet could be sharded holds the state dict itself (no ControlNet key is
        # "models").
        self.controlnet.load_state_dict(state["models"]["controlnet"] if "models" in state else state)

    def model_file_suffix(self) -> str:
        return "" if self.save_as == "diffusers" else ".safetensors"

    def model_paths(self, path_stem: Path) -> list[Path]:
        paths = []
        if self.save_as in ("both", "safetensors"):
            paths.append(path_stem.with_name(path_stem.name + ".safetensors"))
        if self.save_as == "both":
            paths.append(path_stem.with_name(path_stem.name + "_diffusers"))
        if self.save_as == "diffusers":
            paths.append(path_stem)
        return paths

    def save_model(self, path_stem: Path, *, epoch: int, global_step: int) -> Path:
        from library.controlnet_checkpoint import controlnet_checkpoint, save_controlnet_diffusers, save_controlnet_file

        metadata = dict(self.metadata, ss_epoch=str(epoch), ss_steps=str(global_step),
                        ss_training_finished_at=str(time.time()))
        metadata.setdefault("modelspec.title", path_stem.name)  # --metadata_title wins
        paths = self.model_paths(path_stem)
        checkpoint = controlnet_checkpoint(self.controlnet, family=self.family, state_dict=self._weights())
        for path in paths:
            if path.suffix == ".safetensors":
                save_controlnet_file(checkpoint, path, family=self.family, dtype=self.save_dtype, metadata=metadata)
            else:
                save_controlnet_diffusers(checkpoint, path, dtype=self.save_dtype)
            logger.info("saved %s", path)
        return paths[0]


def controlnet_param_groups(controlnet, *, learning_rate: float, control_net_lr: float | None) -> tuple[list[dict],
                                                                                                        list[str]]:
    """The optimizer's parameter groups and their log names. With `--control_net_lr` (kohya's
    sdxl_train_control_net.py meaning) the modules a ControlNet adds (conditioning-image encoder, zero
    convolutions) train at that rate and the copied U-Net encoder at `--learning_rate`; without it, all at
    `--learning_rate`."""
    from library.controlnet_checkpoint import CONTROL_ONLY_MODULES

    if control_net_lr is None:
        return [{"params": list(controlnet.parameters()), "lr": learning_rate}], ["controlnet"]
    added, encoder = [], []
    for name, param in controlnet.named_parameters():
        (added if name.startswith(CONTROL_ONLY_MODULES) else encoder).append(param)
    return ([{"params": added, "lr": control_net_lr}, {"params": encoder, "lr": learning_rate}],
            ["controlnet", "controlnet_encoder"])


# ----------------------------------------------------------------------------------------------------------
# Validation images


@dataclass(frozen=True)
class ValidationPair:
    image: Path
    prompt: str


def pair_validation(images: list[str] | None, prompts: list[str] | None) -> list[ValidationPair]:
    """--validation_image / --validation_prompt paired as the diffusers example pairs them: one image with every
    prompt, one prompt with every image, or equal lists zipped. Raises ValueError naming the flags."""
    images, prompts = images or [], prompts or []
    if not images and not prompts:
        return []
    if not images or not prompts:
        raise ValueError("--validation_image and --validation_prompt go together: give both (one image and several "
                         "prompts, one prompt and several images, or as many of each)")
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise ValueError(f"--validation_image: no such file: {', '.join(missing)}")
    if len(images) == 1:
        images = images * len(prompts)
    elif len(prompts) == 1:
        prompts = prompts * len(images)
    elif len(images) != len(prompts):
        raise ValueError(f"--validation_image ({len(images)}) and --validation_prompt ({len(prompts)}) cannot be "
                         "paired: give one of either, or as many images as prompts")
    return [ValidationPair(Path(i), p) for i, p in zip(images, prompts)]


def validation_size(image_size: tuple[int, int], resolution: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(width, height) to generate a validation sample at: the condition image's own aspect, never larger than
    the image nor than the training resolution's area (a large edge map would otherwise be sampled at a size the
    model never trained at), each side rounded down to `multiple` (the VAE's factor, as diffusers' pipeline
    rounds). diffusers' train_controlnet example passes the image unresized, i.e. its own size; squashing it to
    the square --resolution would distort every sample."""
    width, height = image_size
    scale = min(1.0, math.sqrt(resolution[0] * resolution[1] / (width * height)))
    return tuple(max(multiple, int(side * scale) // multiple * multiple) for side in (width, height))


def grid(images: list[Image.Image]) -> Image.Image:
    """One row: the conditioning image, then the samples."""
    width, height = images[0].size
    row = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        row.paste(image.convert("RGB").resize((width, height)), (i * width, 0))
    return row


class ControlNetValidator:
    """Called by the training loop like the sample-image hook: for each validation pair, `num_images` samples
    with the family's ControlNet pipeline (`StableDiffusionControlNetPipeline`, `StableDiffusionXLControlNetPipeline`)
    at the condition image's aspect (`validation_size`), saved as one grid
    `<output_dir>/validation/<name>_<step>_<idx>.png` and logged to TensorBoard / wandb."""

    def __init__(self, pairs: list[ValidationPair], *, models, controlnet, output_dir: Path, output_name: str,
                 resolution: tuple[int, int], num_images: int, steps: int, seed: int, sampler: str):
        self.pairs, self.models, self.controlnet = pairs, models, controlnet
        self.output_dir, self.output_name = Path(output_dir), output_name
        self.resolution, self.num_images, self.steps, self.seed, self.sampler = (resolution, num_images, steps,
                                                                                 seed, sampler)

    @torch.no_grad()
    def __call__(self, *, epoch: int | None, step: int, run_log=None, trainable=None) -> list[Path]:
        from library.atomic_files import atomic_file
        from library.images import load_image
        from library.samplers import make_scheduler
        from library.sampling import autocast_if_mixed, family_pipeline

        m = self.models
        pipe = family_pipeline(m, make_scheduler(self.sampler, m.prediction_type.value), controlnet=self.controlnet)
        pipe.vae.config.scaling_factor = m.family.vae_scale_factor
        pipe.set_progress_bar_config(disable=True)
        was_training = self.controlnet.training
        self.controlnet.eval()
        paths = []
        try:
            for index, pair in enumerate(self.pairs):
                condition = load_image(pair.image).rgb
                width, height = validation_size(condition.size, self.resolution, pipe.vae_scale_factor)
                condition = condition.resize((width, height), Image.BICUBIC)
                generator = torch.Generator("cpu").manual_seed(self.seed + index)
                with autocast_if_mixed(m.unet, self.controlnet, m.vae, *m.text_encoders):  # fp32 ControlNet, bf16 rest
                    images = pipe(pair.prompt, image=condition, num_inference_steps=self.steps, width=width,
                                  height=height, num_images_per_prompt=self.num_images, generator=generator).images
                row = grid([condition, *images])
                tag = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
                path = self.output_dir / "validation" / f"{self.output_name}_{tag}_{index:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_file(path) as tmp:
                    row.save(tmp, format="PNG")
                paths.append(path)
                if run_log is not None:
                    run_log.add_image(f"validation/{index:02d}", np.asarray(row), step)
        finally:
            if was_training:
                self.controlnet.train()
        return paths
