"""kohya LoRA files as per-module factors: read any weight format with every key accounted for, check, write.

A kohya LoRA (also LoCon) file holds, for each module `<name>` (e.g. `lora_unet_..._attn1_to_q`,
`lora_te_text_model_encoder_layers_0_mlp_fc1`):
- `<name>.lora_down.weight`: [rank, in] for a Linear layer, [rank, in, kh, kw] for a conv;
- `<name>.lora_up.weight`: [out, rank] (Linear) or [out, rank, 1, 1] (conv);
- `<name>.alpha`: a scalar; missing means alpha = rank. The update is ΔW = up @ down * alpha / rank.

The LoRA tools (merge, resize, extract, check) work on these factors directly, without building a model. The
reader accepts .safetensors and PyTorch pickles (.pt / .ckpt, weights-only unpickling), and refuses, by name,
every key that is not in this layout (PEFT `lora_A`/`lora_B`, LyCORIS `hada_*`, DoRA `dora_scale`, ...), a module
with only one of its two factors, mismatched factor shapes, and (on request) NaN / Inf values: a tool never drops
part of a file silently. Textual-inversion embeddings bundled in a LoRA (`bundle_emb.<word>.*`: WebUI's layout,
train_network.py's --bundle_embeddings) are not modules: they are kept aside (`LoRAFile.bundled`), written back by
the tools whose output is still that LoRA, and named when an output has no place for them.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from library.atomic_files import atomic_file
from library.checkpoint_writer import MODELSPEC_VERSION, modelspec_date
from library.safetensors_io import save_tensors
from library.tensor_files import CheckpointError, open_tensor_file
from library.textual_inversion import bundled_words, split_bundled
from networks.lora import weight_delta

logger = logging.getLogger(__name__)

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth")

# Hints for keys of other adapter layouts, so the error says what the file is.
_FOREIGN_LAYOUTS = (
    ((".lora_A.", ".lora_B."), "PEFT / diffusers layout (lora_A / lora_B); convert it to kohya's layout first, "
                               "e.g. with diffusers' convert_state_dict_to_kohya"),
    (("hada_", "lokr_", "lora_mid", ".oft_", "oft_blocks"),
     "LyCORIS (LoHa / LoKr / OFT ...) modules, not a plain LoRA"),
    (("dora_scale", "magnitude"), "DoRA magnitude vectors, which a plain LoRA cannot express"),
    ((".lora.down.", ".lora.up.", "processor."), "old diffusers attention-processor layout"),
)


class LoRAFileError(ValueError):
    """A LoRA file (or a set of them) the tools cannot use; the message names the file and the keys."""


@dataclass(frozen=True)
class LoRAFactors:
    """One module's low-rank update: ΔW = up @ down * alpha / rank."""

    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight this module changes: (out, in) or (out, in, kh, kw)."""
        return (self.up.shape[0], *self.down.shape[1:])

    @property
    def is_kxk_conv(self) -> bool:
        """A 3x3 (or other non-1x1) conv: kohya gives these `conv_dim` / `conv_alpha` instead of the network's."""
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def max_rank(self) -> int:
        """The largest rank the layer allows: min(out, in * kh * kw)."""
        return min(self.up.shape[0], math.prod(self.down.shape[1:]))

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW in fp32 (networks.lora's formula, the one merging and applying use)."""
        return weight_delta(self.up, self.down, self.scale, device=device)

    def times(self, ratio: float) -> "LoRAFactors":
        """The same module with ΔW multiplied by `ratio`: sqrt(|ratio|) on each factor, the sign on down, so
        neither factor's magnitude is distorted (ratio 1 returns the tensors unchanged)."""
        if ratio == 1.0:
            return self
        root = math.sqrt(abs(ratio))
        return replace(self, up=self.up.float() * root, down=self.down.float() * math.copysign(root, ratio))

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.down).all() and torch.isfinite(self.up).all() and math.isfinite(self.alpha))


@dataclass
class LoRAFile:
    modules: dict[str, LoRAFactors]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    bundled: dict[str, torch.Tensor] = field(default_factory=dict)  # bundle_emb.* tensors, as stored

    @property
    def title(self) -> str:
        """What kohya's modelspec.merged_from lists: the file's modelspec.title, else its name."""
        return self.metadata.get("modelspec.title") or (self.path.stem if self.path else "LoRA")

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "LoRA"


@dataclass
class ParsedTensors:
    """A LoRA state dict split into modules, and everything that did not fit kohya's layout."""

    modules: dict[str, LoRAFactors]
    unknown: list[str]  # keys outside the layout
    incomplete: list[str]  # "<name>: has lora_down but no lora_up", ...
    bad_shapes: list[str]  # "<name>: down [4, 32], up [16, 8]", ...
    bundled: dict[str, torch.Tensor] = field(default_factory=dict)  # embeddings carried in the file (bundle_emb.*)


def parse_lora_tensors(tensors: dict[str, torch.Tensor]) -> ParsedTensors:
    """Group `<name>.lora_down.weight` / `.lora_up.weight` / `.alpha` by module; bundled embeddings aside; report
    the rest."""
    tensors, bundled = split_bundled(tensors)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        for suffix, part in ((DOWN, "down"), (UP, "up"), (ALPHA, "alpha")):
            name = key[:-len(suffix)]
            if key.endswith(suffix) and name.startswith("lora_") and "." not in name:
                parts.setdefault(name, {})[part] = tensor
                break
        else:
            unknown.append(key)
    modules, incomplete, bad_shapes = {}, [], []
    for name, got in parts.items():
        missing = [p for p in ("down", "up") if p not in got]
        if missing:
            have = ", ".join(sorted(got))
            incomplete.append(f"{name}: has {have} but no lora_{' / lora_'.join(missing)}")
            continue
        down, up = got["down"], got["up"]
        alpha = got.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            bad_shapes.append(f"{name}: alpha has shape {list(alpha.shape)}, expected a scalar")
            continue
        conv_ok = down.dim() == 4 and up.dim() == 4 and tuple(up.shape[2:]) == (1, 1)
        if not ((down.dim() == 2 and up.dim() == 2) or conv_ok) or up.shape[1] != down.shape[0]:
            bad_shapes.append(f"{name}: lora_down {list(down.shape)}, lora_up {list(up.shape)} (expected [r, in] and "
                              "[out, r], or [r, in, kh, kw] and [out, r, 1, 1])")
            continue
        # No alpha, or alpha 0, means alpha = rank (scale 1), as networks.lora and kohya read it.
        alpha_value = float(alpha.float().item()) if alpha is not None else 0.0
        modules[name] = LoRAFactors(down, up, alpha_value or float(down.shape[0]))
    return ParsedTensors(modules, sorted(unknown), sorted(incomplete), sorted(bad_shapes), bundled)


def short_list(items: list[str], limit: int = 12) -> str:
    shown = "\n    ".join(items[:limit])
    return shown + (f"\n    ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _foreign_hint(keys: list[str]) -> str:
    hints = [hint for markers, hint in _FOREIGN_LAYOUTS if any(m in k for k in keys for m in markers)]
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        hints.insert(0, "a Stable Diffusion checkpoint, not a LoRA (pass it as --sd_model / --model_org)")
    return f" These look like: {'; '.join(hints)}." if hints else ""


def read_lora_file(path: str | Path, *, require_finite: bool = True) -> LoRAFile:
    """Read a kohya LoRA file; raise LoRAFileError naming every key that does not fit (nothing is dropped)."""
    path = Path(path)
    if path.is_dir():
        raise LoRAFileError(f"{path}: is a folder; a LoRA is one .safetensors / .pt file (a diffusers model folder "
                            "is a checkpoint: pass it as --sd_model / --model_org)")
    try:
        with open_tensor_file(path) as source:
            tensors = {name: lazy.load() for name, lazy in source.tensors.items()}
            metadata = dict(source.metadata)
    except CheckpointError as e:
        raise LoRAFileError(str(e)) from e
    parsed = parse_lora_tensors(tensors)
    problems = []
    if parsed.unknown:
        problems.append(f"{len(parsed.unknown)} key(s) not in kohya's LoRA layout (<name>.lora_down.weight, "
                        ".lora_up.weight, .alpha with lora_unet_* / lora_te_* names):\n    "
                        + short_list(parsed.unknown) + _foreign_hint(parsed.unknown))
    if parsed.incomplete:
        problems.append(f"{len(parsed.incomplete)} incomplete module(s):\n    {short_list(parsed.incomplete)}")
    if parsed.bad_shapes:
        problems.append(f"{len(parsed.bad_shapes)} module(s) with inconsistent shapes:\n    "
                        f"{short_list(parsed.bad_shapes)}")
    if not problems and not parsed.modules:
        problems.append("no LoRA modules in the file")
    if problems:
        raise LoRAFileError(f"{path}: cannot use this file as a kohya LoRA; nothing was written.\n  "
                            + "\n  ".join(problems))
    lora = LoRAFile(parsed.modules, metadata, path, parsed.bundled)
    if require_finite:
        check_finite(lora)
    return lora


def other_unet_inputs_note(name: str, metadata: dict[str, str], family) -> str:
    """The sentence a tool logs when it applies a LoRA to a model whose U-Net takes other inputs than the model the
    LoRA was trained on (an SD 1.5 LoRA on SD 1.5 inpainting, depth or extra channels, or the other way round): it
    fits, since such a model differs from its text-to-image model only in the U-Net's first convolution, which LoRA
    modules leave alone. The LoRA's model is its `modelspec.architecture` ("<model id>/lora"); a file without one
    (kohya's older LoRAs) counts as made for the text-to-image model. "" when both take the same inputs."""
    from library.families import FAMILIES, TEXT_TO_IMAGE

    recorded = metadata.get("modelspec.architecture", "").removesuffix("/lora")
    trained = next((f for f in FAMILIES.values() if f.modelspec_architecture == recorded), None)
    trained_inputs = trained.unet_inputs if trained is not None else TEXT_TO_IMAGE
    if trained_inputs == family.unet_inputs:
        return ""
    made_for = (f"trained on {trained.description.split(' (')[0]}" if trained is not None else
                f"made for {metadata.get('ss_base_model_version') or 'a text-to-image model'}")
    return (f"{name}: a LoRA {made_for}, applied to {family.description.split(' (')[0]}: it fits (the same module "
            "names and shapes; the U-Nets differ only in their first convolution, which LoRA leaves alone)")


def non_finite_modules(modules: dict[str, LoRAFactors]) -> list[str]:
    return sorted(name for name, factors in modules.items() if not factors.is_finite())


def check_finite(lora: LoRAFile) -> None:
    bad = non_finite_modules(lora.modules)
    if bad:
        raise LoRAFileError(f"{lora.name}: {len(bad)} module(s) hold NaN or Inf values (a diverged or fp16-overflowed "
                            f"training run?); merging them would poison the result:\n    {short_list(bad)}\n"
                            "  Inspect the file with networks/check_lora_weights.py.")


def read_lora_files(paths: list[str], ratios: list[float] | None, *, default_ratio: float | None = 1.0
                    ) -> tuple[list[LoRAFile], list[float]]:
    """Several LoRAs with one ratio each (`--models` / `--ratios`); ratios default to `default_ratio` each."""
    if not paths:
        raise LoRAFileError("--models: give at least one LoRA file")
    ratios = check_ratios(len(paths), ratios, default=default_ratio)
    return [read_lora_file(p) for p in paths], ratios


def check_ratios(count: int, ratios: list[float] | None, *, default: float | None) -> list[float]:
    if ratios is None or len(ratios) == 0:
        if default is None:
            raise LoRAFileError(f"--ratios: give one ratio per model ({count})")
        return [default] * count
    if len(ratios) != count:
        raise LoRAFileError(f"--ratios: {len(ratios)} ratio(s) for {count} model(s); give exactly one ratio per "
                            "model, in the same order as --models")
    if not all(math.isfinite(r) for r in ratios):
        raise LoRAFileError(f"--ratios: {ratios} contains a non-finite value")
    return list(ratios)


def check_same_layers(loras: list[LoRAFile]) -> None:
    """LoRAs merged together must target the same model: a module in several files must change a weight of the
    same shape in each (an SD 1.x and an SD 2.x LoRA differ in e.g. attn2_to_k's input width)."""
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    conflicts = []
    for lora in loras:
        for name, factors in lora.modules.items():
            if name in seen and seen[name][0] != factors.weight_shape:
                conflicts.append(f"{name}: {list(seen[name][0])} in {seen[name][1]}, {list(factors.weight_shape)} "
                                 f"in {lora.name}")
            seen.setdefault(name, (factors.weight_shape, lora.name))
    versions = {lora.metadata.get("ss_base_model_version") for lora in loras} - {None, ""}
    if conflicts:
        raise LoRAFileError(f"these LoRAs are for different models (base model versions in their metadata: "
                            f"{', '.join(sorted(versions)) or 'not recorded'}): {len(conflicts)} module(s) change "
                            f"weights of different shapes:\n    {short_list(conflicts)}")
    if len(versions) > 1:
        logger.warning("the LoRAs' metadata names different base models (%s); merging anyway, since their shapes "
                       "agree", ", ".join(sorted(versions)))


# ----------------------------------------------------------------------------------------------- metadata


def network_metadata(modules: dict[str, LoRAFactors], carried_args: str | None = None) -> dict[str, str]:
    """ss_network_dim / ss_network_alpha (Linear and 1x1 modules) and conv_dim / conv_alpha in ss_network_args
    (kxk conv modules), as kohya writes them; "Dynamic" when the modules differ (kohya's word for it)."""
    def summary(values: list[float], as_int: bool) -> str | None:
        if not values:
            return None
        if len(set(values)) > 1:
            return "Dynamic"
        return str(int(values[0])) if as_int else str(float(values[0]))

    linear = [f for f in modules.values() if not f.is_kxk_conv]
    conv = [f for f in modules.values() if f.is_kxk_conv]
    out = {"ss_network_module": "networks.lora"}
    out["ss_network_dim"] = summary([f.rank for f in linear], True) or summary([f.rank for f in conv], True)
    out["ss_network_alpha"] = summary([f.alpha for f in linear], False) or summary([f.alpha for f in conv], False)
    try:
        args = json.loads(carried_args) if carried_args else {}
        args = args if isinstance(args, dict) else {}
    except json.JSONDecodeError:
        args = {}
    args.pop("conv_dim", None)
    args.pop("conv_alpha", None)
    if conv:
        args["conv_dim"] = summary([f.rank for f in conv], True)
        args["conv_alpha"] = summary([f.alpha for f in conv], False)
    out["ss_network_args"] = json.dumps(args)
    return out


# What a LoRA derived from others (a merge) inherits from its first input: what it is for, not how that input was
# trained (dataset, tags, learning rates describe a run the result did not come from).
IDENTITY_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_sd_model_name",
                 "ss_clip_skip", "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                 "modelspec.prediction_type", "modelspec.resolution", "modelspec.encoder_layer",
                 "modelspec.timestep_range")


def identity_metadata(lora: LoRAFile) -> dict[str, str]:
    return {k: lora.metadata[k] for k in IDENTITY_KEYS if k in lora.metadata}


def merged_from(titles: list[str]) -> str:
    """kohya's modelspec.merged_from: the inputs' titles, comma separated."""
    return ", ".join(titles)


def lora_metadata(carried: dict[str, str], modules: dict[str, LoRAFactors], *, title: str | None = None,
                  merged_from_titles: list[str] | None = None, comment: str | None = None) -> dict[str, str]:
    """Output metadata: the carried-over input metadata with the network shape (ss_network_dim/alpha/args)
    recomputed from the modules actually written, stale sshs_* hashes dropped (write_lora_file recomputes them),
    and, for a new file, modelspec.title / date / merged_from set anew."""
    metadata = {k: v for k, v in carried.items() if not k.startswith("sshs_")}
    metadata.update(network_metadata(modules, carried.get("ss_network_args")))
    if comment:
        previous = metadata.get("ss_training_comment")
        metadata["ss_training_comment"] = comment + (f"; {previous}" if previous and previous != "None" else "")
    if title is not None:
        metadata["modelspec.title"] = title
        metadata["modelspec.date"] = modelspec_date()
        if any(k.startswith("modelspec.") for k in carried):
            metadata.setdefault("modelspec.sai_model_spec", MODELSPEC_VERSION)
    if merged_from_titles:
        metadata["modelspec.merged_from"] = merged_from(merged_from_titles)
    return metadata


# ----------------------------------------------------------------------------------------------- writing


def check_lora_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise LoRAFileError(f"--save_to {path}: a LoRA is saved as .safetensors (with metadata) or .pt / .ckpt "
                            "(torch.save, no metadata); give a file name with one of those suffixes")
    return path


def lora_state_dict(modules: dict[str, LoRAFactors], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype if dtype is not None and t.is_floating_point() else t.dtype).contiguous()

    state = {}
    for name, f in modules.items():
        state[name + DOWN] = cast(f.down)
        state[name + UP] = cast(f.up)
        state[name + ALPHA] = cast(torch.tensor(f.alpha, dtype=torch.float32))
    return state


def bundles_of(loras: list[LoRAFile]) -> dict[str, torch.Tensor]:
    """The bundled embeddings a LoRA made from `loras` carries: every input's. A word bundled by several inputs with
    different vectors can be carried once only: the first input's is kept, and the warning names the others."""
    carried: dict[str, torch.Tensor] = {}
    conflicts: dict[str, list[str]] = {}
    for lora in loras:
        keys = set(lora.bundled)
        clashing = [k for k in keys if k in carried and not (carried[k].shape == lora.bundled[k].shape and
                                                             torch.equal(carried[k], lora.bundled[k]))]
        for word in bundled_words(clashing):
            conflicts.setdefault(word, []).append(lora.name)
        carried.update({k: v for k, v in lora.bundled.items() if k not in carried})
    for word, names in conflicts.items():
        logger.warning("the embedding %r is bundled with other vectors in %s; the output carries the first input's",
                       word, ", ".join(names))
    return carried


def warn_bundles_left_out(loras: list[LoRAFile], where: str) -> None:
    """Say which bundled embeddings an output with no place for them (a model checkpoint) leaves out."""
    for lora in loras:
        if lora.bundled:
            logger.warning("%s bundles the embedding(s) %s; %s has no place for new words, so they are not in it "
                           "(keep using them from the LoRA file)", lora.name, ", ".join(bundled_words(lora.bundled)),
                           where)


def write_lora_file(path: str | Path, modules: dict[str, LoRAFactors], metadata: dict[str, str] | None,
                    dtype: torch.dtype | None = None, *, bundled: dict[str, torch.Tensor] | None = None) -> Path:
    """Write atomically: .safetensors with the metadata plus fresh sshs_* hashes (sd-webui-additional-networks'
    ids), or .pt / .ckpt with torch.save (no metadata, as kohya). `bundled`: embeddings to carry (`bundle_emb.*`),
    written as they are (not cast to `dtype`: WebUI reads them in fp32 anyway, and they are a few vectors)."""
    from library.training_metadata import additional_networks_hashes

    path = check_lora_output_path(path)
    bad = non_finite_modules(modules)
    if bad:  # never write a poisoned file (e.g. an SVD that met an overflow)
        raise LoRAFileError(f"{path}: refusing to write {len(bad)} module(s) with NaN / Inf values:\n    "
                            f"{short_list(bad)}")
    state = lora_state_dict(modules, dtype)
    if path.suffix.lower() == ".safetensors":
        metadata = dict(metadata or {})
        # Hashes of the network tensors only, as train_network.py computes them for a file it bundles words into.
        metadata.update(additional_networks_hashes(state, None, metadata))
        state.update({k: v.detach().to("cpu").contiguous() for k, v in (bundled or {}).items()})
        save_tensors(path, state, metadata)
    else:
        if metadata:
            logger.info("%s: .pt / .ckpt files carry no metadata; use .safetensors to keep it", path)
        state.update({k: v.detach().to("cpu").contiguous() for k, v in (bundled or {}).items()})
        with atomic_file(path) as tmp:
            torch.save(state, tmp)
    logger.info("wrote %s (%d modules%s)", path, len(modules),
                f", bundled embedding(s) {', '.join(bundled_words(bundled))}" if bundled else "")
    return path


def run_file_tool(action, setup_parser, argv: list[str] | None) -> int:
    """The exit status of a LoRA file tool's `main`: `action(args)` on the parsed arguments; a ValueError (our
    LoRAFileError, CheckpointError, OutputPathError) is a bad input, printed as "error: ..." with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        action(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
