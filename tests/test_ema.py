"""EMA of the trained weights (--use_ema): diffusers' decay rule, fp32 averages, exact resume, swap and restore."""

from __future__ import annotations

import io

import pytest
import torch

from library.ema import EMA, ema_decay


def _parameters(dtype=torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
            for shape in [(3, 4), (5,), (2, 2, 3)]]


def _trajectory(parameters, steps: int, *, seed: int = 1) -> list[list[torch.Tensor]]:
    """The values the parameters take after each of `steps` fake optimizer steps (a seeded random walk)."""
    generator = torch.Generator().manual_seed(seed)
    values, out = [p.detach().clone() for p in parameters], []
    for _ in range(steps):
        values = [(v.float() + 0.1 * torch.randn(v.shape, generator=generator)).to(v.dtype) for v in values]
        out.append(values)
    return out


def _set(parameters, values) -> None:
    with torch.no_grad():
        for p, v in zip(parameters, values):
            p.copy_(v)


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# The decay rule (diffusers EMAModel.get_decay)


def test_decay_rule_by_hand():
    # Default ramp (1 + k) / (10 + k) with k = step - update_after_step - 1; decay 0 while k <= 0.
    assert [ema_decay(n, decay=0.9999) for n in (1, 2, 3, 11)] == [0.0, 2 / 11, 3 / 12, 11 / 20]
    assert ema_decay(10**6, decay=0.9999) == 0.9999  # the ceiling
    assert ema_decay(81, decay=0.9999) == pytest.approx(0.9)
    assert [ema_decay(n, decay=0.9999, update_after_step=3) for n in (1, 4, 5)] == [0.0, 0.0, 2 / 11]
    assert ema_decay(3, decay=0.1) == 0.1  # capped
    assert ema_decay(2, decay=0.9, min_decay=0.5) == 0.5  # floored (2/11 < 0.5)
    assert ema_decay(1, decay=0.9, min_decay=0.5) == 0.0  # ...but the first update always copies
    # Warmup: 1 - (1 + k / inv_gamma) ** -power
    assert ema_decay(5, decay=0.9999, use_ema_warmup=True, inv_gamma=2.0, power=0.5) == 1 - (1 + 4 / 2.0) ** -0.5


def test_decay_rule_matches_diffusers():
    from diffusers.training_utils import EMAModel

    for kwargs in ({}, {"update_after_step": 7}, {"use_ema_warmup": True, "power": 0.75}, {"min_decay": 0.3},
                   {"decay": 0.99, "use_ema_warmup": True, "inv_gamma": 3.0}):
        reference = EMAModel(_parameters(), **kwargs)
        ours = EMA(_parameters(), **kwargs)
        for n in range(1, 300):
            assert ours.decay_at(n) == reference.get_decay(n), (kwargs, n)


# ----------------------------------------------------------------------------------------------------------
# Values


def test_values_follow_the_recurrence():
    """ema_0 = weights at construction; ema_n = d_n * ema_(n-1) + (1 - d_n) * weights_n, computed here in float64
    from the decays written out by hand (update_after_step=1: d = 0, 0, 2/11, 3/12, 4/13, 5/14)."""
    parameters = _parameters()
    ema = EMA(parameters, decay=0.9999, update_after_step=1)
    expected = [p.detach().double() for p in parameters]
    decays = [0.0, 0.0, 2 / 11, 3 / 12, 4 / 13, 5 / 14]
    for d, values in zip(decays, _trajectory(parameters, len(decays))):
        _set(parameters, values)
        assert ema.update() == d
        expected = [d * e + (1 - d) * v.double() for e, v in zip(expected, values)]
        for shadow, e in zip(ema.shadow, expected):
            assert shadow.dtype == torch.float32
            torch.testing.assert_close(shadow.double(), e, rtol=0, atol=2e-7)  # fp32 rounding of O(1) values
    assert ema.num_updates == 6 and ema.last_decay == 5 / 14


def test_bit_identical_to_diffusers_ema_model():
    """Same arithmetic as diffusers' EMAModel.step (fp32 weights, where its EMA is fp32 too)."""
    from diffusers.training_utils import EMAModel

    parameters = _parameters()
    ours = EMA(parameters, decay=0.99, use_ema_warmup=True, power=0.75)
    reference = EMAModel(parameters, decay=0.99, use_ema_warmup=True, power=0.75)
    for values in _trajectory(parameters, 40):
        _set(parameters, values)
        ours.update()
        reference.step(parameters)
    for a, b in zip(ours.shadow, reference.shadow_params):
        assert torch.equal(a, b)


def test_bf16_weights_keep_an_fp32_average():
    """With bf16 weights the average is fp32: a 1e-4 share of a small change still moves it (in bf16 it could not:
    1e-4 relative is far below bf16's resolution)."""
    parameters = _parameters(torch.bfloat16)
    ema = EMA(parameters, decay=0.9999, min_decay=0.9999)  # a constant decay after the first update (a copy)
    ema.update()
    start = [s.clone() for s in ema.shadow]
    values = _trajectory(parameters, 1)[0]
    _set(parameters, values)
    ema.update()
    for s0, s1, v, p in zip(start, ema.shadow, values, parameters):
        assert s1.dtype == torch.float32 and p.dtype == torch.bfloat16
        expected = s0.double() - 1e-4 * (s0.double() - v.double())
        torch.testing.assert_close(s1.double(), expected, rtol=0, atol=1e-7)
        assert not torch.equal(s1, s0)


def test_cpu_resident_average():
    parameters = _parameters()
    ema = EMA(parameters, device="cpu")
    _set(parameters, _trajectory(parameters, 1)[0])
    ema.update()
    assert all(s.device.type == "cpu" for s in ema.shadow)


def test_frozen_parameters_are_copied():
    parameters = _parameters()
    parameters[1].requires_grad_(False)
    ema = EMA(parameters, decay=0.5, min_decay=0.5)
    ema.update()  # the first update copies all
    values = _trajectory(parameters, 1)[0]
    _set(parameters, values)
    assert ema.update() == 0.5
    assert torch.equal(ema.shadow[1], values[1])
    assert not torch.equal(ema.shadow[0], values[0])


# ----------------------------------------------------------------------------------------------------------
# Exact resume


def test_resume_mid_run_equals_uninterrupted():
    steps, cut = 12, 5
    parameters = _parameters(torch.bfloat16)
    trajectory = _trajectory(parameters, steps)
    uninterrupted = EMA(parameters, decay=0.999, update_after_step=2)
    for values in trajectory:
        _set(parameters, values)
        uninterrupted.update()

    parameters = _parameters(torch.bfloat16)
    first = EMA(parameters, decay=0.999, update_after_step=2)
    for values in trajectory[:cut]:
        _set(parameters, values)
        first.update()
    state = _roundtrip(first.state_dict())

    parameters = _parameters(torch.bfloat16)
    _set(parameters, trajectory[cut - 1])  # the resumed run loads its trained weights
    resumed = EMA(parameters, decay=0.999, update_after_step=2)  # starts as a copy of the weights...
    resumed.load_state_dict(state)  # ...and continues the saved average
    for values in trajectory[cut:]:
        _set(parameters, values)
        resumed.update()
    assert resumed.num_updates == steps and resumed.last_decay == uninterrupted.last_decay
    for a, b in zip(resumed.shadow, uninterrupted.shadow):
        assert torch.equal(a, b)


def test_loading_keeps_device_and_dtype_and_shares_nothing():
    parameters = _parameters()
    source = EMA(parameters)
    source.update()
    target = EMA(_parameters(), dtype=torch.float64)
    target.load_state_dict(source.state_dict())
    assert all(s.dtype == torch.float64 for s in target.shadow)
    source.shadow[0].add_(1.0)  # the loaded values are copies
    assert not torch.equal(target.shadow[0], source.shadow[0].double())


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(shadow=s["shadow"][:2]), "2 tensors, but this run averages 3"),
    (lambda s: s["shadow"].__setitem__(1, torch.zeros(6)), r"tensor 1 has shape \(6,\)"),
    (lambda s: s["settings"].__setitem__("decay", 0.99), "--ema_decay"),
    (lambda s: s.pop("num_updates"), "not a state written by EMA.state_dict"),
])
def test_foreign_state_is_refused(change, message):
    ema = EMA(_parameters())
    state = _roundtrip(ema.state_dict())
    change(state)
    with pytest.raises(ValueError, match=message):
        EMA(_parameters()).load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------
# Swap in for saving / sampling, restore after


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_applied_swaps_in_and_restores_bit_identical(dtype):
    parameters = _parameters(dtype)
    ema = EMA(parameters, decay=0.9, min_decay=0.9)
    for values in _trajectory(parameters, 5):
        _set(parameters, values)
        ema.update()
    training = [p.detach().clone() for p in parameters]
    with ema.applied():
        for p, s in zip(parameters, ema.shadow):
            assert p.dtype == dtype and torch.equal(p, s.to(dtype))
        assert all(not torch.equal(p, t) for p, t in zip(parameters, training))
        with pytest.raises(RuntimeError, match="inside EMA.applied"):
            ema.update()
    for p, t in zip(parameters, training):
        assert torch.equal(p, t)
    assert ema.num_updates == 5


def test_applied_restores_on_error():
    parameters = _parameters()
    ema = EMA(parameters)
    _set(parameters, _trajectory(parameters, 1)[0])
    training = [p.detach().clone() for p in parameters]
    with pytest.raises(KeyError):
        with ema.applied(backup_device=None):
            raise KeyError("sampling failed")
    for p, t in zip(parameters, training):
        assert torch.equal(p, t)
    ema.update()  # usable again


def test_copy_to_other_parameters():
    """E.g. into a separate model used only for saving."""
    parameters = _parameters()
    ema = EMA(parameters)
    others = _parameters(torch.float16)
    ema.copy_to(others)
    for o, s in zip(others, ema.shadow):
        assert torch.equal(o, s.half())
    with pytest.raises(ValueError, match="2 parameters given"):
        ema.copy_to(others[:2])
