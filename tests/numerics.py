"""How the tests compare numbers: the tolerances, each with the measured spread it rests on, and the golden-loss check.

The same code gives other floats on another CPU (torch and oneDNN pick kernels per instruction set: an Intel Xeon with
AVX-512/AMX, an AMD EPYC with AVX2 only, a CUDA GPU), and two implementations of the same math (ours and diffusers',
a merged LoRA and an applied one) round differently. Bit equality is kept where the same bytes are moved (file round
trips, resume, determinism); everything computed two ways is compared here, with one tolerance per kind of
comparison, stated once.

The spreads below were measured by running the tests that use each check with SDTRAIN_RECORD_SPREAD=<file> (each
check then appends its measured deviation to that JSON-lines file, and records instead of asserting), on an AMD EPYC
(AVX2) natively and under ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=AVX2 and both, against golden numbers
recorded on an Intel Xeon (AVX-512, AMX) (golden losses: see below):

    SDTRAIN_RECORD_SPREAD=/tmp/spread.jsonl ATEN_CPU_CAPABILITY=default pytest -m numbers
    python tests/numerics.py /tmp/spread.jsonl      # the largest deviation per check and case

Each tolerance is that largest deviation with margin, and each docstring says what a real defect moves. Measured
again after the tiny models were calibrated (library/tiny_models.py), on the EPYC under ATEN_CPU_CAPABILITY=default
ONEDNN_MAX_CPU_ISA=AVX2: fp32 outputs 1.4e-5, fp64 1.2e-6, images 1 level / mean 5e-4, intended image changes
28.9 levels at least, golden losses as below: all within the earlier figures. On an AMD EPYC with AVX-512 and
AVX512_BF16 (torch capability AVX512, oneDNN avx512_core_bf16), against the goldens recorded on the AVX2 EPYC, all
of `-m numbers`: golden losses 1e-7 at step 1 and 5.7e-5 later, fp32 outputs 1.1e-5, fp64 8.3e-6, images 1 level /
mean 4.9e-4: inside the figures above too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

GOLDEN_DIR = Path(__file__).parent / "golden"

# Losses of a few steps of training a tiny model, against the stored golden run. The first step's loss comes before
# any update: CPUs differ only by the forward pass's rounding there. Later steps carry that rounding through every
# update, and it grows. Measured spread, largest relative deviation of any case: step 1 5.3e-5, later steps 2.4e-3
# (an AMD EPYC against numbers recorded on an Intel Xeon with AVX-512/AMX; ATEN_CPU_CAPABILITY=default on the EPYC:
# 2.4e-5 / 1.6e-3). The goldens were re-recorded on the EPYC when the tiny models were calibrated
# (library/tiny_models.py); against those, ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 gives 2e-7 / 1.9e-4
# (AVX2 is this CPU's own oneDNN ISA). Each tolerance is 4-5x the largest spread; what each case guards moves its losses by
# 11x .. 4000x the tolerance: tests/golden/README.md.
GOLDEN_FIRST_STEP_REL = 2.5e-4
GOLDEN_LOSS_REL = 1e-2

# Outputs of a tiny fp32 model (U-Net noise prediction, text-encoder states, VAE latents) computed two ways: ours vs
# diffusers' loaders and PEFT, merged LoRA vs applied, one batch vs another. Relative to the output's largest
# magnitude. Measured: <= 3e-6 for the same weights through other code, 2.8e-5 for mixed-rank LoRAs through PEFT,
# 7.8e-5 for merged vs applied (W + dW rounded to fp32 once more, amplified by the random tiny U-Net). 5e-4 is 6x
# that; a real defect seen here (diffusers giving one module the file's most common alpha instead of its own:
# test_diffusers_heterogeneous_attention_alphas) moves the outputs by 1.8e-2, 36x.
FP32_OUTPUT_REL = 5e-4

# The same with the forward pass in fp64 over fp32-stored weights: what is left is the weights' own fp32 rounding
# (a merged W + dW is rounded once more than W and dW kept apart). Measured 1.6e-6; 2e-5 is 12x that.
FP64_OUTPUT_REL = 2e-5

# One run as 1 process x batch 2 and as 2 processes (DDP, gloo) x batch 1 (tests/recipe_helpers.py
# one_and_two_processes): the trained weights' difference relative to the last step's update (training_deviation
# below). Measured on an AMD EPYC with AVX-512, natively / under ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2:
# LoRA after 2 steps with gradient accumulation 2.3e-4 / 1.4e-3, DreamBooth (U-Net + text encoder, 1 step) 3.0e-5 /
# 6.4e-5, ControlNet (2 steps) 5.8e-6 / 8.0e-6, SDXL LoRA (1 step) 3.6e-6 / 4.9e-6. Float rounding, not the split: the
# hand-written averaging DDP replaced gave the LoRA files bit for bit, and a second step grows the first step's
# last-bit differences (the same 1-process LoRA run with 2 threads instead of 1 moves its whole update by 3.4e-4,
# the split by 2.8e-4; a full model after 2 steps 2.6e-3 / 1.1e-2, so its test takes 1 step, which moves every
# weight). 2e-2 is 14x the largest. A fault in the
# averaging moves the LoRA by 0.87 and more (divided twice 0.87-1.0, summed 1.5-1.9, not averaged 1.2-1.3:
# tests/test_train_network.py, planted through tests/ddp_probe.py), 40x the tolerance. The same tolerance holds two
# "machines" (two launches with --num_machines 2: the same two processes, meeting through another rendezvous;
# measured 2.3e-4 / 1.4e-3, as the one launch) and a U-Net LoRA trained on caches filled by 2 processes (the same
# cache bytes: tests/test_cache_split.py; 3.5e-5 / 2.3e-4).
PROCESS_SPLIT_REL = 2e-2

# 8-bit images from our generation and diffusers' pipeline with the same models, prompts and seeds (and one image
# alone vs in a batch): the largest difference of any pixel channel, in levels (0..255), and the mean over all
# channels. Measured: 2 levels at most, mean 0.17 (img2img under ATEN_CPU_CAPABILITY=default; 0.057 natively).
IMAGE_MAX_LEVELS = 4
IMAGE_MEAN_LEVELS = 0.5
# What the tests change on purpose (another seed, a textual-inversion word) moves the mean by 8.3 .. 36 levels;
# assert_images_differ asks for half the smallest, 8x IMAGE_MEAN_LEVELS.
IMAGE_INTENDED_CHANGE_LEVELS = 4.0

_RECORD = os.environ.get("SDTRAIN_RECORD_SPREAD")
_SENSITIVITY = os.environ.get("SDTRAIN_GOLDEN_SENSITIVITY") == "1"


def _record(kind: str, what: str, deviation: float, limit: float) -> None:
    with open(_RECORD, "a") as f:
        f.write(json.dumps({"kind": kind, "what": what, "deviation": deviation, "limit": limit}) + "\n")


def _check(kind: str, what: str, deviation: float, limit: float, detail: str = "") -> None:
    """Assert deviation <= limit, or record it (SDTRAIN_RECORD_SPREAD) for measuring the spread."""
    if _RECORD:
        _record(kind, what, deviation, limit)
        return
    assert deviation <= limit, f"{what}: {kind} deviation {deviation:.3g} > tolerance {limit:.3g}{detail}"


def relative_deviation(got, want) -> float:
    """max |got - want| / max |want|: rounding scales with the magnitude of what is computed."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape, f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()


def assert_outputs_close(got, want, *, what: str, rel: float = FP32_OUTPUT_REL) -> None:
    """Model outputs computed two ways agree within `rel` of their magnitude (FP32_OUTPUT_REL, or FP64_OUTPUT_REL
    for fp64 forwards)."""
    kind = "fp64 output" if rel == FP64_OUTPUT_REL else "fp32 output" if rel == FP32_OUTPUT_REL else "output"
    _check(kind, what, relative_deviation(got, want), rel)


def training_deviation(got: dict, want: dict, want_before_last_step: dict) -> float:
    """How far trained weights (name -> tensor) of one run done two ways differ: |got - want| relative to the last
    step's update |want - want_before_last_step| (norms over all the tensors), which must be a real one."""
    keys = sorted(want)
    assert keys and sorted(got) == keys, "other tensors"
    final, other = (torch.cat([d[k].double().flatten() for k in keys]) for d in (want, got))
    step = (final - torch.cat([want_before_last_step[k].double().flatten() for k in keys])).norm()
    assert step > 1e-6 * final.norm(), "the last step changed nothing"
    return ((other - final).norm() / step).item()


def assert_process_split_close(deviation: float, *, what: str) -> None:
    """A `training_deviation` of 1 vs 2 processes within PROCESS_SPLIT_REL."""
    _check("process split", what, deviation, PROCESS_SPLIT_REL)


def assert_images_close(got, want, *, what: str) -> None:
    """Two 8-bit images of the same generation: every channel within IMAGE_MAX_LEVELS, mean within
    IMAGE_MEAN_LEVELS (another seed or prompt word moves the mean by 8 .. 36 levels)."""
    got, want = np.asarray(got).astype(np.int16), np.asarray(want).astype(np.int16)
    assert got.shape == want.shape, f"{what}: image shapes differ: {got.shape} vs {want.shape}"
    difference = np.abs(got - want)
    _check("image max levels", what, float(difference.max()), IMAGE_MAX_LEVELS)
    _check("image mean levels", what, float(difference.mean()), IMAGE_MEAN_LEVELS)


def assert_images_differ(a, b, *, what: str) -> None:
    """What a test changed on purpose (seed, prompt word) changed the image: by IMAGE_INTENDED_CHANGE_LEVELS on
    average at least, far more than rounding alone can."""
    difference = float(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).mean())
    if _RECORD:
        _record("image mean levels, intended change", what, difference, IMAGE_INTENDED_CHANGE_LEVELS)
    assert difference >= IMAGE_INTENDED_CHANGE_LEVELS, f"{what}: the images differ by only {difference:.3g} levels"


class PlantedBug:
    """A real defect planted for a sensitivity run (SDTRAIN_GOLDEN_SENSITIVITY=1), for a golden case whose point
    has no option that can simply be removed: `plant()` puts the bug in place and returns its undo."""

    def __init__(self, description: str, plant):
        self.description, self.plant = description, plant

    def __repr__(self) -> str:
        return f"planted bug: {self.description}"


def _patch(owner, name: str, replacement_for):
    original = getattr(owner, name)
    setattr(owner, name, replacement_for(original))
    return lambda: setattr(owner, name, original)


def _epsilon_target_for_v():
    from diffusers import DDPMScheduler

    return _patch(DDPMScheduler, "get_velocity", lambda original: lambda self, sample, noise, timesteps: noise)


def _captions_lost():
    from library import text_conditioning

    def empty_captions(original):
        return lambda tokenizer, captions, *args, **kwargs: original(tokenizer, [""] * len(captions), *args, **kwargs)

    undos = [_patch(text_conditioning, name, empty_captions) for name in ("tokenize", "tokenize_weighted")]
    return lambda: [undo() for undo in undos]


def _cache_mixes_images():
    from library.latent_cache import LatentCache

    def get(original):
        def wrong_image(self, item, flip):
            # The next cached image (in cache-id order) of the same latent size: what a cache keyed wrongly returns.
            mine = original(self, item, flip)
            others = sorted(k for k, v in self._latents.items()
                            if k[1] == flip and k[0] != item.cache_id and v.shape == mine.shape)
            return self._latents[others[0]] if others else mine
        return wrong_image

    return _patch(LatentCache, "get", get)


def _size_ids_of_the_bucket():
    """Planted: every sample's SDXL size/crop ids say "uncropped, at the bucket's size" (what a trainer that does not
    carry each image's size and crop would feed the U-Net)."""
    from library import train_dataset
    from library.text_conditioning import SizeConditioning

    original = train_dataset.size_conditioning

    def of_the_bucket(plan, flip):
        target = original(plan, flip).target_size
        return SizeConditioning(original_size=target, crop_top_left=(0, 0), target_size=target)

    train_dataset.size_conditioning = of_the_bucket
    return lambda: setattr(train_dataset, "size_conditioning", original)


SIZE_IDS_LOST = PlantedBug("SDXL size/crop ids of the bucket, not of the image", _size_ids_of_the_bucket)


# What a golden case is there for, when it is not one removable option: the model family (the v-prediction cases),
# where its captions come from (metadata files), or the latent cache itself (a cache working correctly gives the
# losses of no cache: removing --cache_latents cannot show that it works).
FAMILY_CASE = PlantedBug("epsilon target for a v model", _epsilon_target_for_v)
CAPTIONS_LOST = PlantedBug("every caption reaches the text encoder empty", _captions_lost)
CACHE_MIXES_IMAGES = PlantedBug("the latent cache returns another image's latents", _cache_mixes_images)
_undo_planted: list = []  # the undo of the planted bug, while one is in place


def _remove_planted_bug() -> None:
    while _undo_planted:
        _undo_planted.pop()()


def golden_case_args(case: str, args: list[str], covers: dict) -> list[str]:
    """A golden case's extra arguments. covers[case] names the option the case is there for (tokens, an exact
    subsequence of `args`), or is a PlantedBug. With SDTRAIN_GOLDEN_SENSITIVITY=1 the option is removed (or the bug
    planted) and check_golden_losses measures how far that moves the losses, instead of asserting: the case catches
    a real defect. Figures and command: tests/golden/README.md."""
    tokens = covers[case]
    _remove_planted_bug()
    if isinstance(tokens, PlantedBug):
        if _SENSITIVITY:
            _undo_planted.append(tokens.plant())
        return args
    starts = [i for i in range(len(args) - len(tokens) + 1) if args[i:i + len(tokens)] == tokens]
    if not tokens or not starts:
        raise ValueError(f"golden case {case}: the option it covers, {tokens}, is not in its arguments {args}")
    return args[:starts[0]] + args[starts[0] + len(tokens):] if _SENSITIVITY else args


def golden_tolerances(n_steps: int) -> list[float]:
    """The relative tolerance of each logged step: the first step's loss is computed before any update (only the
    forward pass's rounding differs between CPUs), later ones after updates that carry the rounding forward."""
    return [GOLDEN_FIRST_STEP_REL] + [GOLDEN_LOSS_REL] * (n_steps - 1)


def check_golden_losses(golden_file: str, case: str, losses: list[float]) -> None:
    """The losses of a recipe test against tests/golden/<golden_file>[case], each step within its tolerance
    (golden_tolerances). UPDATE_GOLDEN=1 stores these losses instead (do it on purpose, for a change that is meant
    to move them, and say why in the commit). What each case guards, and by how much: tests/golden/README.md.

    With SDTRAIN_GOLDEN_SENSITIVITY=1 (see golden_case_args) the largest deviation in multiples of the tolerance is
    recorded (SDTRAIN_RECORD_SPREAD) or asserted to be at least 10, and the rest of the test, which is about the
    intact case, skipped."""
    path = GOLDEN_DIR / golden_file
    what = f"{golden_file}[{case}]"
    if os.environ.get("UPDATE_GOLDEN"):
        data = json.loads(path.read_text()) if path.exists() else {}
        data[case] = losses
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    expected = json.loads(path.read_text())[case]
    assert len(losses) == len(expected), f"{what}: {len(losses)} losses logged, {len(expected)} stored"
    deviations = [abs(a - b) / abs(b) for a, b in zip(losses, expected)]
    tolerances = golden_tolerances(len(losses))
    ratios = [d / t for d, t in zip(deviations, tolerances)]
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    if _SENSITIVITY:
        import pytest

        _remove_planted_bug()
        if _RECORD:
            _record("golden, option removed (x tol)", what, ratios[worst], 10.0)
        else:
            assert ratios[worst] >= 10, (f"{what}: without the option it covers, the losses move by only "
                                         f"{ratios[worst]:.3g}x the tolerance")
        pytest.skip(f"sensitivity run: {what} moved by {ratios[worst]:.3g}x the tolerance")
    if _RECORD:
        _record("golden loss, step 1", what, deviations[0], tolerances[0])
        if len(deviations) > 1:
            _record("golden loss, later steps", what, max(deviations[1:]), GOLDEN_LOSS_REL)
        for step, (deviation, tolerance) in enumerate(zip(deviations, tolerances), start=1):
            _record(f"golden loss, step {step}", "all cases", deviation, tolerance)
        return
    assert ratios[worst] <= 1, (f"{what}: loss at step {worst + 1} is {losses[worst]!r}, stored {expected[worst]!r}: "
                                f"relative deviation {deviations[worst]:.3g} > tolerance {tolerances[worst]:.3g}")


def _summarise(record_file: str) -> None:
    worst: dict[tuple[str, str], float] = {}
    for line in Path(record_file).read_text().splitlines():
        r = json.loads(line)
        key = (r["kind"], r["what"])
        worst[key] = max(worst.get(key, 0.0), r["deviation"])
    for (kind, what), deviation in sorted(worst.items()):
        print(f"{kind:28s} {deviation:10.3g}  {what}")


if __name__ == "__main__":
    _summarise(sys.argv[1])
