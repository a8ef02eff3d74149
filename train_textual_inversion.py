"""Textual inversion for Stable Diffusion 1.x / 2.x: teach the text encoder a new word (kohya-ss/sd-scripts'
train_textual_inversion.py interface; SDXL: sdxl_train_textual_inversion.py, the same recipe).

    accelerate launch train_textual_inversion.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir data --output_dir out --output_name mychar --token_string mychar --init_word girl \\
        --num_vectors_per_token 4 --resolution 512 --learning_rate 5e-3 --max_train_steps 2000

Only the new token vectors train (the U-Net, the rest of the text encoder and every other embedding row stay
bit-identical). Captions use the token string (expanded to all its vectors), or the built-in prompt templates with
`--use_object_template` / `--use_style_template`. Saved as `.pt` (WebUI's layout, the default, as kohya) or
`.safetensors` (`emb_params`); both load in WebUI's `embeddings/` folder, ComfyUI and diffusers'
`load_textual_inversion`. The recipe handles the model's text encoders as a list: with SDXL's two the word gets
vectors in each (one trained parameter per encoder, one optimizer group; `library/textual_inversion.add_word`, which
pivotal tuning shares) and the file holds one tensor per encoder (`clip_l`, `clip_g`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from library import train_args  # noqa: E402
from library import training_setup as setup  # noqa: E402
from library import textual_inversion as ti  # noqa: E402
from library.checkpoint_writer import modelspec_keys  # noqa: E402
from library.diffusion_objective import DiffusionObjective  # noqa: E402
from library.train_dataset import describe_samples  # noqa: E402
from library.training_loop import Trainer  # noqa: E402
from library.training_metadata import run_metadata  # noqa: E402

logger = logging.getLogger("train_textual_inversion")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_args.add_common_training_arguments(p, implemented=(train_args.FP8_BASE_FLAG,))
    train_args.add_fused_step_arguments(p)
    train_args.add_fp8_base_arguments(p)
    g = p.add_argument_group("textual inversion")
    g.add_argument("--token_string", required=True, help="the new word, e.g. mychar (a made-up word is best)")
    g.add_argument("--init_word", default=None, help="start from this word's embedding (default: the table mean)")
    g.add_argument("--num_vectors_per_token", type=int, default=1)
    g.add_argument("--weights", default=None, help="continue from this embedding file (.pt or .safetensors)")
    g.add_argument("--use_object_template", action="store_true", help="captions from object templates")
    g.add_argument("--use_style_template", action="store_true", help="captions from style templates")
    g.add_argument("--save_model_as", choices=["pt", "ckpt", "safetensors"], default="pt")
    return p


class EmbeddingTask:
    """The new word's vectors (one parameter per text encoder) as a `TrainingTask`."""

    train_text_encoder = True  # gradients flow through the (frozen) text encoders into the new vectors

    STATE_KEY = "added"  # the first encoder's vectors ("added_2": SDXL's bigG), as states have always named them

    def __init__(self, word: ti.TrainedWord, *, save_as: str, save_dtype, metadata: dict[str, str]):
        self.word = word
        self.save_as, self.save_dtype, self.metadata = save_as, save_dtype, metadata

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.word.state(self.STATE_KEY)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.word.load_state(state, self.STATE_KEY)

    def model_file_suffix(self) -> str:
        return "." + self.save_as

    def save_model(self, path_stem: Path, *, epoch: int, global_step: int) -> Path:
        path = path_stem.with_name(path_stem.name + self.model_file_suffix())
        metadata = dict(self.metadata, ss_epoch=str(epoch), ss_steps=str(global_step))
        metadata.setdefault("modelspec.title", path_stem.name)  # --metadata_title wins
        ti.save_encoder_embeddings(path, self.word.parameters, list(self.word.keys),
                                   token_string=self.word.tokens.token_string, step=global_step, metadata=metadata,
                                   dtype=self.save_dtype)
        logger.info("saved %s", path)
        return path


# kohya's split: this script trains SD 1.x / 2.x, sdxl_train_textual_inversion.py SDXL (same flags).
TRAINS = setup.TrainedArchs("train_textual_inversion.py", setup.SD_ARCHS,
                            elsewhere=(("sdxl", "sdxl_train_textual_inversion.py"),))


def train(args: argparse.Namespace, trains: setup.TrainedArchs = TRAINS) -> Path:
    start = setup.begin_run(args)
    if args.use_object_template and args.use_style_template:
        raise SystemExit("error: --use_object_template and --use_style_template exclude each other; give one")

    # Models, with the new word in every text encoder
    checkpoint = setup.read_base_model(args, trains)
    family, prediction = checkpoint.family, checkpoint.prediction_type
    prompts = setup.load_sample_prompts(args, family)
    accelerator = setup.make_accelerator(args)
    start = setup.same_seed_everywhere(start, accelerator)
    setup.check_fused_step(args, start, accelerator)  # before the models load (it depends on the process count)
    models, precision = setup.load_models(args, checkpoint, accelerator)
    try:
        word = ti.add_word(models, token_string=args.token_string, num_vectors=args.num_vectors_per_token,
                           init_word=args.init_word, weights=args.weights, dtype=precision.trained_dtype)
    except ValueError as e:  # EmbeddingFileError too
        raise SystemExit(f"error: {e}") from None
    setup.store_base_in_float8(args, models, precision)  # the new word's rows are an embedding: they keep their dtype
    new_tokens = word.tokens
    logger.info("new tokens %s (ids %s)", " ".join(new_tokens.tokens), ", ".join(map(str, new_tokens.ids)))
    if args.gradient_checkpointing:
        for text_encoder in models.text_encoders:
            text_encoder.gradient_checkpointing_enable()
            text_encoder.train()  # transformers only checkpoints in training mode; CLIP has no dropout in SD

    # Data: captions with the token string (expanded to all its vectors), or templates
    dataset, data_summary = setup.build_dataset(args, family, start.seed)
    templates = ti.OBJECT_TEMPLATES if args.use_object_template else \
        ti.STYLE_TEMPLATES if args.use_style_template else None
    dataset.caption_rewrite = ti.CaptionRewrite([new_tokens], templates)
    batches = setup.epoch_batches(dataset, start.seed, accelerator)
    if args.debug_dataset:
        print("\n".join(describe_samples(dataset, batches)))
        return start.output_dir / (start.output_name + "." + args.save_model_as)
    if templates is None:  # every template contains the token
        try:
            ti.check_token_in_captions((i.record for i in dataset.items), args.token_string, flag="--token_string",
                                       alternatives=", or use --use_object_template / --use_style_template")
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    max_train_steps = setup.count_steps(args, dataset, batches)
    setup.cache_latents(args, dataset, models.vae, precision, accelerator)

    param_groups = [{"params": word.parameters, "lr": args.learning_rate}]  # kohya: one group, every encoder
    optimizer, lr_scheduler = setup.build_optimization(args, start.optimizer, param_groups, max_train_steps,
                                                       accelerator)
    resolution = "{}x{}".format(*train_args.parse_resolution(args.resolution, family.default_resolution))
    metadata = modelspec_keys(family, prediction, kind="textual-inversion", implementation="diffusers",
                              resolution=resolution)
    metadata.update({"ss_token_string": args.token_string, "ss_num_vectors_per_token": str(args.num_vectors_per_token),
                     "ss_init_word": str(args.init_word)})
    metadata.update(run_metadata(args, dataset=dataset, data_summary=data_summary, seed=start.seed,
                                 max_train_steps=max_train_steps, resolution=resolution))
    task = EmbeddingTask(word, save_as=args.save_model_as, save_dtype=setup.SAVE_DTYPES.get(args.save_precision),
                         metadata=metadata)
    prompts = [p.__class__(**{**p.__dict__, "prompt": new_tokens.expand(p.prompt)}) for p in prompts]
    fingerprint = {"family": family.name, "seed": start.seed, "token_string": args.token_string,
                   "num_vectors": args.num_vectors_per_token, "templates": bool(templates),
                   "train_batch_size": args.train_batch_size, "learning_rate": args.learning_rate,
                   "gradient_accumulation_steps": args.gradient_accumulation_steps,
                   **setup.fused_step_fingerprint(args), **setup.float8_fingerprint(args),
                   "dataset_items": hashlib.sha256("\n".join(f"{i.record.path}|{i.bucket}" for i in dataset.items)
                                                   .encode()).hexdigest()[:16]}
    trainer = Trainer(task=task, unet=models.unet, vae=models.vae, text_conditioner=setup.text_conditioner(args, models),
                      dataset=dataset, batches=batches,
                      objective=DiffusionObjective(train_args.objective_config(args, prediction)),
                      optimizer=optimizer, lr_scheduler=lr_scheduler, accelerator=accelerator,
                      config=setup.loop_config(args, start, family, max_train_steps,
                                               default_project="textual_inversion"),
                      run_fingerprint=fingerprint, trainable_parameters=word.parameters,
                      weight_dtype=precision.weight_dtype, sampler=setup.make_sampler(args, prompts, models, start),
                      lr_names=["textencoder"], validator=setup.make_validator(args, dataset, start, accelerator))
    setup.run_trainer(trainer, args)
    return start.output_dir / (start.output_name + task.model_file_suffix())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train(train_args.parse_args(setup_parser(), argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
