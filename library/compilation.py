"""torch.compile of the models a run calls over and over (kohya's `--torch_compile` and `--dynamo_backend`).

kohya hands the backend to accelerate (`Accelerator(dynamo_backend=...)` when --torch_compile is given, else "NO"),
which compiles each model it prepares with torch.compile, with the mode / fullgraph / dynamic / regional settings of
`accelerate launch --dynamo_*` (the ACCELERATE_DYNAMO_* variables). Here accelerate prepares one wrapper of the whole
step instead (data_parallel.TrainedForward: tokenising, text encoding and the U-Net, so that DDP sees every trained
parameter), which is not the thing to compile. So the Accelerator never compiles (make_accelerator passes "no", as
kohya does without --torch_compile), and the same settings, read by accelerate's own TorchDynamoPlugin, are applied
here to the models, in place (`nn.Module.compile`, or accelerate's in-place regional compilation): the module tree,
parameter names, adapters wrapping layers and everything saved stay as they are.

Compiled: by a trainer, the U-Net and the text encoders (the ControlNet too, train_controlnet.py), whatever trains;
by a cache tool, the model it runs (the VAE's encoder, or the text encoders). Compilation is lazy: a model is traced
at its first call, after adapters are applied, and a model that is never called (text encoders whose outputs are
cached) costs nothing.

kohya's backend list names some that today's torch no longer has (the nvfuser ones, fx2trt, ofi, kohya's misspelt
"tensort"); a backend torch cannot run here is refused by name with the ones it can.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

# kohya's --dynamo_backend choices (library/train_util.py), taken as they are so its command lines parse.
KOHYA_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt",
                  "onnxrt", "tensort", "ipex", "tvm")
DEFAULT_BACKEND = "inductor"  # kohya's default
# Backends torch registers but that run only with another package installed.
_PACKAGE_OF = {"tvm": "tvm", "onnxrt": "onnxruntime", "ipex": "intel_extension_for_pytorch"}


def _missing_requirement(backend: str) -> str | None:
    """Why torch cannot run `backend` here (it may not know it at all), or None."""
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        return f"torch {torch.__version__.split('+')[0]} has no backend {backend!r}"
    package = _PACKAGE_OF.get(backend)
    if package and importlib.util.find_spec(package) is None:
        return f"the {backend} backend needs the {package} package, which is not installed"
    if backend == "cudagraphs" and not torch.cuda.is_available():
        return "the cudagraphs backend needs a CUDA GPU"
    return None


def backend_problem(backend: str) -> str | None:
    """Why `backend` cannot compile here, with the kohya backends that can; None if it can."""
    problem = _missing_requirement(backend)
    if problem is None:
        return None
    if backend == "tensort":
        problem += " (kohya's misspelling of tensorrt, which needs the torch_tensorrt package)"
    usable = [name for name in KOHYA_BACKENDS if _missing_requirement(name) is None]
    return f"{problem}; usable here: {', '.join(usable)}"


def check_compile_flags(torch_compile: bool, dynamo_backend: str | None) -> list[str]:
    """Problems with --torch_compile / --dynamo_backend, naming the flags (empty: fine)."""
    if not torch_compile:
        if dynamo_backend is not None:
            return [f"--dynamo_backend {dynamo_backend}: only chooses --torch_compile's backend (kohya ignores it "
                    "without --torch_compile): add --torch_compile to compile the models, or drop --dynamo_backend"]
        return []
    problem = backend_problem(dynamo_backend or DEFAULT_BACKEND)
    return [f"--torch_compile --dynamo_backend {dynamo_backend or DEFAULT_BACKEND}: {problem}"] if problem else []


@dataclass(frozen=True)
class CompileSettings:
    """torch.compile's arguments for the models: the backend, and what `accelerate launch --dynamo_*` set."""

    backend: str
    options: dict = field(default_factory=dict)  # mode, fullgraph, dynamic (accelerate's TorchDynamoPlugin)
    regional: bool = False  # compile repeated blocks once each (accelerate's regional compilation)

    @classmethod
    def from_flags(cls, torch_compile: bool, dynamo_backend: str | None) -> CompileSettings | None:
        if not torch_compile:
            return None
        from accelerate.utils import TorchDynamoPlugin

        # backend "no" only to read the ACCELERATE_DYNAMO_* settings: accelerate's enum lacks some torch backends
        # (ipex), and the backend is kohya's flag anyway.
        plugin = TorchDynamoPlugin(backend="no")
        options = {k: v for k, v in plugin.to_kwargs().items() if k not in ("backend", "disable")}
        return cls(backend=dynamo_backend or DEFAULT_BACKEND, options=options,
                   regional=bool(plugin.use_regional_compilation))

    def apply(self, module: torch.nn.Module, *, what: str) -> None:
        """Compile `module` in place (traced at its first call)."""
        kwargs = {"backend": self.backend, **self.options}
        if self.regional:
            from accelerate.utils.other import compile_regions_fsdp2  # in place, unlike compile_regions

            compile_regions_fsdp2(module, **kwargs)
        else:
            module.compile(**kwargs)
        logger.info("%s: compiled with torch.compile(%s)%s", what, ", ".join(f"{k}={v!r}" for k, v in kwargs.items()),
                    " by regions" if self.regional else "")


def accelerate_launch_backend() -> str | None:
    """The backend `accelerate launch --dynamo_backend` (or accelerate's config) asked for, if not "no"."""
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")
    return None if backend.lower() == "no" else backend.lower()
