"""kohya's sampler names and the diffusers schedulers they stand for, with SD's training noise schedule: what the
trainers' sample images, train_db's class images and gen_img.py sample with (`--sample_sampler`, `--sampler`, a
prompt line's `--ss`), and the names WebUI shows for them in a PNG's parameters."""

from __future__ import annotations

SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
SAMPLER_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2",
                   "k_dpm_2_a": "dpm_2_a"}
# The names WebUI shows (and reads back from PNG Info) for the samplers that have an exact WebUI counterpart.
WEBUI_SAMPLER_NAMES = {"ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
                       "heun": "Heun", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "dpmsolver++": "DPM++ 2M"}


def sampler_name(name: str) -> str:
    key = SAMPLER_ALIASES.get(name.lower(), name.lower())
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(list(SAMPLERS) + list(SAMPLER_ALIASES))}")
    return key


def make_scheduler(name: str, prediction_type: str, *, zero_terminal_snr: bool = False):
    """A diffusers scheduler for a kohya sampler name, with SD's training noise schedule."""
    import diffusers

    class_name, extra = SAMPLERS[sampler_name(name)]
    # steps_offset 1 as in SD's own scheduler config: diffusers' SD pipelines set it anyway, with a FutureWarning
    # ("the configuration file of this scheduler is outdated") for each; it moves only "leading" spacings' steps
    # (DDIM, PNDM), and every sampler but those spaces its steps otherwise.
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "prediction_type": prediction_type, "steps_offset": 1, **extra}
    if class_name in ("DDIMScheduler", "PNDMScheduler"):
        config["set_alpha_to_one"] = False
    if class_name == "DDIMScheduler":
        config["clip_sample"] = False
    if zero_terminal_snr:
        config["rescale_betas_zero_snr"] = True
        config["timestep_spacing"] = "trailing"
    return getattr(diffusers, class_name).from_config(config)
