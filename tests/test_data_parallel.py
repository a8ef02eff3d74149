"""DDP through accelerate (library/data_parallel.py): kohya's flags as accelerate's handlers, the refused
combinations named, what DDP wraps, and when it must look for parameters without gradients. The 2-process runs
themselves are recipe tests (the `two_processes` tests of test_train_network.py, test_train_db.py,
test_train_controlnet.py and test_sdxl_train_network.py)."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from library import train_args
from library.data_parallel import (DDPSettings, TrainedForward, UnusedParameters, kwargs_handlers,
                                   prepare_trained_forward)


def parsed(*flags: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    train_args.add_common_training_arguments(p)
    return train_args.parse_args(p, ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "out",
                                     *flags])


def test_kohya_ddp_flags_become_accelerate_handlers():
    settings = train_args.ddp_settings(parsed("--ddp_timeout", "7", "--ddp_gradient_as_bucket_view",
                                              "--ddp_static_graph"))
    assert settings == DDPSettings(timeout_minutes=7, gradient_as_bucket_view=True, static_graph=True)
    ddp, init = kwargs_handlers(settings)
    assert isinstance(ddp, DistributedDataParallelKwargs) and isinstance(init, InitProcessGroupKwargs)
    assert ddp.to_kwargs() == {"gradient_as_bucket_view": True, "static_graph": True}
    assert init.to_kwargs() == {"timeout": timedelta(minutes=7)}
    # Without the flags: accelerate's and torch's defaults, nothing passed on.
    assert [h.to_kwargs() for h in kwargs_handlers(train_args.ddp_settings(parsed()))] == [{}]


def test_the_accelerator_is_made_with_the_handlers():
    from accelerate.state import AcceleratorState

    from library.training_setup import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = make_accelerator(parsed("--ddp_timeout", "7", "--ddp_gradient_as_bucket_view"))
        assert accelerator.ddp_handler.gradient_as_bucket_view and not accelerator.ddp_handler.static_graph
        assert accelerator.init_handler.timeout == timedelta(minutes=7)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("flags,message", [
    (["--ddp_static_graph", "--gradient_accumulation_steps", "2"],
     "--ddp_static_graph does not work with --gradient_accumulation_steps 2"),
    (["--ddp_timeout", "0"], "--ddp_timeout 0: give the minutes to wait, at least 1"),
])
def test_refused_ddp_flags_are_named(flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train_args.check_training_flags(parsed(*flags))


def test_trained_forward_holds_the_trained_parameters_once_and_runs_the_step():
    """DDP reduces what the wrapped module registers: the trained parameters themselves (not copies), each once."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(3))
    module = TrainedForward([a, b, a], lambda x, *, scale: x * scale)
    assert [id(p) for p in module.parameters()] == [id(a), id(b)]
    assert module(torch.tensor(3.0), scale=2).item() == 6.0
    assert not list(module.buffers())


FIXED = UnusedParameters("a skipped layer", same_every_step=True)
CHANGING = UnusedParameters("module dropout", same_every_step=False)


@pytest.mark.parametrize("processes,static_graph,unused,find_unused", [
    (2, False, [], False),  # every trained parameter gets a gradient in every step: no search
    (2, False, [FIXED], True),
    (2, False, [FIXED, CHANGING], True),
    (2, True, [FIXED], False),  # the static graph finds a fixed set once, in the first step
    (1, True, [CHANGING], False),  # one process: no DDP, nothing to refuse
])
def test_ddp_looks_for_unused_parameters_where_some_can_be(processes, static_graph, unused, find_unused):
    accelerator = SimpleNamespace(num_processes=processes,
                                  ddp_handler=DistributedDataParallelKwargs(static_graph=static_graph),
                                  prepare_model=lambda module, device_placement: ("prepared", module))
    module = TrainedForward([torch.nn.Parameter(torch.ones(1))], lambda: None)
    assert prepare_trained_forward(accelerator, module, unused=unused) == ("prepared", module)
    assert accelerator.ddp_handler.find_unused_parameters is find_unused
    assert accelerator.ddp_handler.static_graph is static_graph


def test_a_static_graph_is_refused_where_the_used_parameters_change():
    accelerator = SimpleNamespace(num_processes=2, ddp_handler=DistributedDataParallelKwargs(static_graph=True))
    with pytest.raises(ValueError, match=r"--ddp_static_graph: .*\(module dropout\); drop --ddp_static_graph"):
        prepare_trained_forward(accelerator, TrainedForward([], lambda: None), unused=[FIXED, CHANGING])


@pytest.mark.parametrize("network_args,clip_skip,train_text_encoder,reasons", [
    ([], None, True, []),
    ([], 2, True, [("the LoRA of a text encoder's last layer", True)]),
    ([], 2, False, []),  # a U-Net-only LoRA: the text encoder's layers do not train
    (["module_dropout=0.1"], None, True, [("module_dropout", False)]),
])
def test_what_a_lora_run_can_leave_without_gradients(network_args, clip_skip, train_text_encoder, reasons):
    from library.text_conditioning import CaptionEncoding, conditioner_for
    from library.tiny_models import fresh_tiny_models
    from networks.lora import create_network
    from train_network import LoRATask, network_kwargs_from

    models = fresh_tiny_models("sd1")
    network = create_network(1.0, 4, 1.0, models.vae, models.text_encoder, models.unet,
                             **network_kwargs_from(network_args))
    task = LoRATask(network, train_text_encoder=train_text_encoder, save_dtype=None, save_model_as="safetensors",
                    metadata={})
    conditioner = conditioner_for(models.family, models.tokenizers, models.text_encoders,
                                  CaptionEncoding(clip_skip=clip_skip))
    unused = task.unused_parameters(conditioner)
    assert [(reason in u.reason, same) for u, (reason, same) in zip(unused, reasons)] == [(True, s) for _, s in reasons]
    assert len(unused) == len(reasons)
    # An external network module may skip its own modules: assumed to change between steps.
    external = LoRATask(torch.nn.Module(), train_text_encoder=False, save_dtype=None, save_model_as="safetensors",
                        metadata={})
    assert [u.same_every_step for u in external.unused_parameters(conditioner)] == [False]


@pytest.mark.parametrize("module,reasons", [("lora_fa", []), ("oft", []), ("dylora", [("networks.dylora", False)])])
def test_what_the_other_network_types_can_leave_without_gradients(module, reasons):
    """LoRA-FA's frozen down matrices are buffers, not trained parameters, and OFT's modules always act: DDP need
    not look. A DyLoRA step trains one unit of ranks, and which changes from step to step."""
    import importlib

    from library.text_conditioning import CaptionEncoding, conditioner_for
    from library.tiny_models import fresh_tiny_models
    from train_network import LoRATask

    models = fresh_tiny_models("sd1")
    network = importlib.import_module(f"networks.{module}").create_network(1.0, 4, 1e-3, None, models.text_encoder,
                                                                            models.unet)
    task = LoRATask(network, train_text_encoder=module != "oft", save_dtype=None, save_model_as="safetensors",
                    metadata={})
    unused = task.unused_parameters(conditioner_for(models.family, models.tokenizers, models.text_encoders,
                                                    CaptionEncoding()))
    assert [(reason in u.reason, u.same_every_step) for u, (reason, _) in zip(unused, reasons)] == \
        [(True, same) for _, same in reasons]
    assert len(unused) == len(reasons)


@pytest.mark.parametrize("family,clip_skip,skips", [
    ("sd1", None, False), ("sd1", 2, True),
    ("sdxl", None, True),  # CLIP ViT-L's penultimate hidden state
    ("sdxl-refiner", None, False),  # bigG's penultimate state, but its last layer makes the pooled output
])
def test_which_conditionings_skip_a_text_encoder_s_last_layer(family, clip_skip, skips):
    from library.text_conditioning import CaptionEncoding, conditioner_for
    from library.tiny_models import fresh_tiny_models

    models = fresh_tiny_models(family)
    conditioner = conditioner_for(models.family, models.tokenizers, models.text_encoders,
                                  CaptionEncoding(clip_skip=clip_skip))
    assert conditioner.skips_last_layer is skips


@pytest.mark.parametrize("processes,environ,refused", [
    # accelerate launch --cpu --num_processes 2 (or --num_machines 2) without mpirun: one process, an address, no rank
    (1, {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),
    (1, {"ACCELERATE_USE_CPU": "True"}, False),  # accelerate launch --cpu, one process
    (2, {"ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, False),  # --multi_gpu on CPU
    (1, {"MASTER_ADDR": "10.0.0.1"}, False),  # python train_network.py with MASTER_ADDR left in the shell
])
def test_a_cpu_launch_that_started_one_of_several_processes_is_refused(processes, environ, refused):
    """accelerate launch --cpu asked for several processes starts one per machine (measured with accelerate 1.15:
    each a 1-process run, main process on every machine); training would go on alone on each."""
    from library.training_setup import check_every_process_started

    if refused:
        with pytest.raises(SystemExit, match=r"--cpu was asked for several processes.*ACCELERATE_USE_CPU=true "
                                             r"accelerate launch --multi_gpu"):
            check_every_process_started(processes, environ)
    else:
        check_every_process_started(processes, environ)
