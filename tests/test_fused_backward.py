"""--fused_backward_pass: the optimizer stepped inside backward, one parameter at a time.

The per-parameter optimizers run the same arithmetic on the same gradients as the unfused optimizer, so the
results are compared bit for bit (CPU, one thread: conftest), with the LR schedulers of build_scheduler driving both.
"""

from __future__ import annotations

import io

import pytest
import torch

from library.fused_backward import FusedBackwardOptimizer, check_fused_backward_pass
from library.optimizers import OptimizerConfig, build_optimizer, build_scheduler

STEPS = 6


def _mlp(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    # Linear(80, 64) has 5,120 weights: above bitsandbytes' min_8bit_size (4,096), so AdamW8bit quantizes it.
    return torch.nn.Sequential(torch.nn.Linear(8, 80), torch.nn.GELU(), torch.nn.Linear(80, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 4)).to(dtype)


def _groups(model: torch.nn.Module, config: OptimizerConfig) -> list[dict]:
    """Two groups with different learning rates, as a trainer with a text-encoder lr would pass."""
    return [{"params": list(model[0].parameters()), "lr": config.learning_rate * 2},
            {"params": list(model[2].parameters()) + list(model[4].parameters())}]


def _mlp_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)
    return ((model(x.to(dtype)).float() - y) ** 2).mean()


def _train(model, optimizer, scheduler, steps: range, loss_fn, *, clip_per_parameter: float = 0.0) -> list:
    """The shared loop's order of calls: backward, (clip), optimizer.step, lr_scheduler.step, zero_grad. Returns the
    learning rates used by each step and a copy of the weights after each step."""
    history = []
    for step in steps:
        lrs = scheduler.get_last_lr()
        loss_fn(model, step).backward()
        if clip_per_parameter:  # the unfused reference of the fused per-parameter clipping
            for param in model.parameters():
                torch.nn.utils.clip_grad_norm_(param, clip_per_parameter)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((lrs, [p.detach().clone() for p in model.parameters()]))
    return history


def _assert_same_history(unfused: list, fused: list) -> None:
    for step, ((lr_a, weights_a), (lr_b, weights_b)) in enumerate(zip(unfused, fused, strict=True)):
        assert lr_a == lr_b, f"step {step}: learning rates {lr_a} != {lr_b}"
        for i, (a, b) in enumerate(zip(weights_a, weights_b, strict=True)):
            assert torch.equal(a, b), f"step {step}, parameter {i}: max difference {(a - b).abs().max().item()}"


def _assert_same_state(a, b, where="state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _roundtrip(obj):
    """Through a file, as a training state is saved and loaded (no tensor shared with the running objects)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _config(name: str, **kwargs) -> OptimizerConfig:
    return OptimizerConfig(optimizer_type=name, learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps="2",
                           **kwargs)


PER_PARAMETER_OPTIMIZERS = ["AdamW", "Adafactor", "AdamW8bit", "Lion", "SGDNesterov"]


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("name", PER_PARAMETER_OPTIMIZERS)
def test_fused_equals_unfused_on_mlp(name, clip):
    config = _config(name, max_grad_norm=clip)
    model = _mlp()
    optimizer = build_optimizer(config, _groups(model, config))
    unfused = _train(model, optimizer, build_scheduler(config, optimizer, STEPS), range(STEPS), _mlp_loss,
                     clip_per_parameter=clip)

    fused_model = _mlp()
    fused_optimizer = FusedBackwardOptimizer(config, _groups(fused_model, config))
    fused = _train(fused_model, fused_optimizer, build_scheduler(config, fused_optimizer, STEPS), range(STEPS),
                   _mlp_loss)

    lrs = [lr for lr, _ in unfused]
    assert len({tuple(lr) for lr in lrs}) >= 4 and lrs[0][0] == 2 * lrs[0][1]  # warmup, cosine, two groups
    _assert_same_history(unfused, fused)
    # Same state, in the same format: a state saved by either run can resume the other.
    _assert_same_state(optimizer.state_dict(), fused_optimizer.state_dict())


def test_clipping_is_per_parameter():
    """With max_grad_norm, each parameter's gradient is clipped by its own norm (kohya's fused behaviour), which
    differs from the unfused global clipping."""
    config = _config("SGDNesterov", max_grad_norm=0.05)
    model = _mlp()
    optimizer = build_optimizer(config, _groups(model, config))
    loss = _mlp_loss(model, 0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.05)
    optimizer.step()
    globally_clipped = [p.detach().clone() for p in model.parameters()]

    fused_model = _mlp()
    FusedBackwardOptimizer(config, _groups(fused_model, config))
    _mlp_loss(fused_model, 0).backward()
    assert any(not torch.equal(a, b) for a, b in zip(globally_clipped, fused_model.parameters()))


def test_bf16_weights_adamw():
    """--full_bf16: the optimizer steps bf16 weights; fused and unfused still agree bit for bit."""
    config = _config("AdamW")
    model = _mlp(torch.bfloat16)
    optimizer = build_optimizer(config, _groups(model, config))
    unfused = _train(model, optimizer, build_scheduler(config, optimizer, STEPS), range(STEPS), _mlp_loss)
    fused_model = _mlp(torch.bfloat16)
    fused_optimizer = FusedBackwardOptimizer(config, _groups(fused_model, config))
    fused = _train(fused_model, fused_optimizer, build_scheduler(config, fused_optimizer, STEPS), range(STEPS),
                   _mlp_loss)
    _assert_same_history(unfused, fused)


# ----------------------------------------------------------------------------------------------------------
# A tiny diffusers U-Net (cross-attention, group norms, convolutions), with --max_grad_norm


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)


def _unet_loss(unet, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    cond = torch.randn(2, 5, 16, generator=generator)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    return torch.nn.functional.mse_loss(unet(latents, timesteps, cond).sample, target)


@pytest.mark.parametrize("name", ["AdamW", "Adafactor"])
def test_fused_equals_unfused_on_tiny_unet(name):
    steps = 4
    config = _config(name, max_grad_norm=0.01)  # small enough that most parameters are clipped
    unet = _tiny_unet()
    optimizer = build_optimizer(config, unet.parameters())
    unfused = _train(unet, optimizer, build_scheduler(config, optimizer, steps), range(steps), _unet_loss,
                     clip_per_parameter=config.max_grad_norm)

    fused_unet = _tiny_unet()
    fused_optimizer = FusedBackwardOptimizer(config, fused_unet.parameters())
    fused = _train(fused_unet, fused_optimizer, build_scheduler(config, fused_optimizer, steps), range(steps),
                   _unet_loss)
    _assert_same_history(unfused, fused)
    assert not torch.equal(unfused[-1][1][0], _tiny_unet().conv_in.weight)  # it trained


# ----------------------------------------------------------------------------------------------------------
# Exact resume


def _fused_run(config, *, state=None, steps: range):
    model = _mlp()
    optimizer = FusedBackwardOptimizer(config, _groups(model, config))
    scheduler = build_scheduler(config, optimizer, STEPS)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    history = _train(model, optimizer, scheduler, steps, _mlp_loss)
    return history, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}


@pytest.mark.parametrize("name", ["AdamW", "Adafactor", "AdamW8bit"])
def test_resume_equals_uninterrupted(name):
    config = _config(name, max_grad_norm=0.05)
    uninterrupted, _ = _fused_run(config, steps=range(STEPS))
    first, state = _fused_run(config, steps=range(3))
    second, _ = _fused_run(config, state=_roundtrip(state), steps=range(3, STEPS))
    _assert_same_history(uninterrupted, first + second)


def test_unfused_state_resumes_fused():
    """The state format is the unfused optimizer's: a state saved without --fused_backward_pass continues with it
    exactly as the unfused run would (clipping off, where the two agree)."""
    config = _config("AdamW", max_grad_norm=0.0)
    model = _mlp()
    optimizer = build_optimizer(config, _groups(model, config))
    scheduler = build_scheduler(config, optimizer, STEPS)
    uninterrupted = _train(model, optimizer, scheduler, range(STEPS), _mlp_loss)

    model = _mlp()
    optimizer = build_optimizer(config, _groups(model, config))
    scheduler = build_scheduler(config, optimizer, STEPS)
    first = _train(model, optimizer, scheduler, range(3), _mlp_loss)
    state = _roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()})
    second, _ = _fused_run(config, state=state, steps=range(3, STEPS))
    _assert_same_history(uninterrupted, first + second)


def test_state_of_another_model_is_refused():
    config = _config("AdamW")
    _, state = _fused_run(config, steps=range(1))
    model = _mlp()
    optimizer = FusedBackwardOptimizer(config, list(model.parameters()))  # one group instead of two
    with pytest.raises(ValueError, match="parameter groups"):
        optimizer.load_state_dict(state["optimizer"])


# ----------------------------------------------------------------------------------------------------------
# What the loop sees


def test_backward_steps_and_frees_gradients_step_is_a_noop():
    config = _config("AdamW")
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = FusedBackwardOptimizer(config, _groups(model, config))
    _mlp_loss(model, 0).backward()
    assert all(p.grad is None for p in model.parameters())
    after = [p.detach().clone() for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    optimizer.step()
    optimizer.zero_grad()
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))

    optimizer.remove_hooks()
    assert not optimizer.hooks_attached
    _mlp_loss(model, 1).backward()  # plain backward again: gradients kept, weights untouched
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))
    optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_are_not_stepped():
    config = _config("AdamW")
    model = _mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    FusedBackwardOptimizer(config, _groups(model, config))
    _mlp_loss(model, 0).backward()
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[0].bias, _mlp()[0].bias)


def test_through_accelerate_prepare_optimizer():
    """The trainers pass the optimizer through accelerate (AcceleratedOptimizer); it still steps nothing itself."""
    from accelerate import Accelerator

    config = _config("Adafactor")
    model = _mlp()
    optimizer = build_optimizer(config, _groups(model, config))
    unfused = _train(model, optimizer, build_scheduler(config, optimizer, STEPS), range(STEPS), _mlp_loss)

    accelerator = Accelerator(cpu=True)
    fused_model = _mlp()
    fused_optimizer = FusedBackwardOptimizer(config, _groups(fused_model, config))
    scheduler = build_scheduler(config, fused_optimizer, STEPS)
    prepared = accelerator.prepare_optimizer(fused_optimizer, device_placement=False)
    fused = _train(fused_model, prepared, scheduler, range(STEPS), _mlp_loss)
    _assert_same_history(unfused, fused)


# ----------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("name", ["Prodigy", "prodigyopt.Prodigy", "AdamWScheduleFree", "SGDScheduleFree",
                                  "DAdaptAdam", "DAdaptation", "LBFGS"])
def test_global_state_optimizers_are_refused(name):
    for call in (lambda: check_fused_backward_pass(name),
                 lambda: FusedBackwardOptimizer(_config(name), list(_mlp().parameters()))):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert "--fused_backward_pass" in message and f"--optimizer_type {name}" in message


@pytest.mark.parametrize("name", PER_PARAMETER_OPTIMIZERS)
def test_per_parameter_optimizers_pass_the_check(name):
    check_fused_backward_pass(name)


@pytest.mark.parametrize("kwargs, flag", [({"gradient_accumulation_steps": 2}, "--gradient_accumulation_steps 2"),
                                          ({"num_processes": 2}, "2 processes"),
                                          ({"mixed_precision": "fp16"}, "--mixed_precision fp16")])
def test_incompatible_settings_are_refused(kwargs, flag):
    with pytest.raises(ValueError, match="--fused_backward_pass") as error:
        check_fused_backward_pass("AdamW", **kwargs)
    assert flag in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# --fused_optimizer_groups: the same step in shares of the parameters


@pytest.mark.parametrize("groups", [1, 3, 100])
@pytest.mark.parametrize("name", ["AdamW", "Adafactor", "AdamW8bit"])
def test_groups_equal_unfused_on_mlp(name, groups):
    """Shares (one share of everything, three, more shares than parameters) step exactly as the unfused optimizer;
    the state keeps the unfused format."""
    config = _config(name, max_grad_norm=0.0)
    model = _mlp()
    optimizer = build_optimizer(config, _groups(model, config))
    unfused = _train(model, optimizer, build_scheduler(config, optimizer, STEPS), range(STEPS), _mlp_loss)

    fused_model = _mlp()
    fused_optimizer = FusedBackwardOptimizer(config, _groups(fused_model, config), groups=groups)
    # A share never spans the two param groups (2 and 4 parameters): ceil(6 / 3) = 2 per share -> 1 + 2 shares.
    expected_shares = {1: 2, 3: 3, 100: 6}[groups]
    assert len(fused_optimizer._chunks) == expected_shares
    fused = _train(fused_model, fused_optimizer, build_scheduler(config, fused_optimizer, STEPS), range(STEPS),
                   _mlp_loss)
    _assert_same_history(unfused, fused)
    _assert_same_state(optimizer.state_dict(), fused_optimizer.state_dict())


def test_groups_clip_each_share_by_its_own_norm():
    """max_grad_norm with shares: each share's gradients are scaled by that share's norm (kohya's
    --fused_optimizer_groups), which differs from per-parameter and from global clipping."""
    config = _config("SGDNesterov", max_grad_norm=0.05)
    model = _mlp()
    optimizer = build_optimizer(config, _groups(model, config))
    _mlp_loss(model, 0).backward()
    shares = [list(model[0].parameters()), [model[2].weight, model[2].bias], [model[4].weight, model[4].bias]]
    for share in shares:
        torch.nn.utils.clip_grad_norm_(share, 0.05)
    optimizer.step()

    fused_model = _mlp()
    FusedBackwardOptimizer(config, _groups(fused_model, config), groups=3)
    _mlp_loss(fused_model, 0).backward()
    assert all(p.grad is None for p in fused_model.parameters())  # every share stepped, gradients freed
    for a, b in zip(model.parameters(), fused_model.parameters()):
        assert torch.equal(a, b)

    per_parameter = _mlp()
    FusedBackwardOptimizer(config, _groups(per_parameter, config))
    _mlp_loss(per_parameter, 0).backward()
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), per_parameter.parameters()))


def test_a_share_with_an_unused_parameter_is_stepped_by_step():
    """A parameter that gets no gradient in a forward (unused, or frozen since: --pivotal_steps) leaves its share
    waiting after backward; the loop's optimizer.step() steps it, as the unfused optimizer would."""
    config = _config("AdamW", max_grad_norm=0.0)

    def loss_without_last_bias(model, step):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 8, generator=generator)
        hidden = model[3](model[2](model[1](model[0](x))))
        return (torch.nn.functional.linear(hidden, model[4].weight) ** 2).mean()

    model = _mlp()
    optimizer = build_optimizer(config, _groups(model, config))
    unfused = _train(model, optimizer, build_scheduler(config, optimizer, STEPS), range(STEPS), loss_without_last_bias)

    fused_model = _mlp()
    fused_optimizer = FusedBackwardOptimizer(config, _groups(fused_model, config), groups=3)
    loss_without_last_bias(fused_model, 0).backward()
    assert fused_model[4].weight.grad is not None  # its share (with the unused bias) waits for step()
    fused_optimizer.zero_grad()
    fused_model = _mlp()
    fused_optimizer = FusedBackwardOptimizer(config, _groups(fused_model, config), groups=3)
    fused = _train(fused_model, fused_optimizer, build_scheduler(config, fused_optimizer, STEPS), range(STEPS),
                   loss_without_last_bias)
    _assert_same_history(unfused, fused)


def test_groups_refusals_name_their_flag():
    with pytest.raises(ValueError, match="--fused_optimizer_groups does not work with --optimizer_type Prodigy"):
        FusedBackwardOptimizer(_config("Prodigy"), list(_mlp().parameters()), groups=2)
    with pytest.raises(ValueError, match="--fused_optimizer_groups 0"):
        FusedBackwardOptimizer(_config("AdamW"), list(_mlp().parameters()), groups=0)
    with pytest.raises(ValueError, match="--fused_optimizer_groups does not work with --gradient_accumulation_steps"):
        check_fused_backward_pass("AdamW", gradient_accumulation_steps=2, flag="--fused_optimizer_groups")
