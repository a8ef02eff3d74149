"""LoRA-FA (Zhang et al. 2023, https://arxiv.org/abs/2308.03303) by kohya's module name: `--network_module
networks.lora_fa`. A LoRA whose down projection (A) is drawn once from a normal distribution and then frozen; only
the up projection (B) trains, which halves the optimizer state and keeps the update in a fixed random subspace.

Its files are plain kohya LoRA files (`<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`): WebUI, ComfyUI,
diffusers and the LoRA tools read them as any LoRA. Everything else (which layers, their names, the network args
conv_dim / block_dims / down_lr_weight / dropouts ..., saving, loading, merging) is networks.lora's.

Where this differs from kohya's networks/lora_fa.py, and why:
- the frozen down matrix is a buffer rather than a parameter with requires_grad off, so nothing can train it by
  accident (kohya's network-wide `requires_grad_(True)` in prepare_grad_etc does not reach it, and no optimizer
  group or weight decay ever holds it);
- --scale_weight_norms rescales the up matrix alone, by the whole ratio: kohya scales both factors by its square
  root, which changes the matrix LoRA-FA promises to keep frozen;
- LoRA+ (loraplus_*) is refused: only one factor trains, so a ratio between the two factors' learning rates has
  nothing to act on (kohya's lora_fa accepts no such key either).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from networks import lora
from networks.lora import LoRAModule, LoRANetwork

# kohya's lora_fa.py takes networks.lora's keys of its time: everything but LoRA+.
ARG_KEYS = tuple(k for k in lora._ARG_TYPES if not k.startswith("loraplus_"))
FILE_LAYOUT = "lora"  # plain kohya LoRA keys (train_network.py / gen_img.py: our own names, no translation)


class LoRAFAModule(LoRAModule):
    """A LoRA module whose down projection is frozen (a buffer) after a normal initialisation."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout, rank_dropout, module_dropout)
        in_dim = org_module.in_channels if isinstance(org_module, nn.Conv2d) else org_module.in_features
        down = torch.empty_like(self.lora_down.weight)
        # The paper's (and kohya's) normal initialisation of the frozen A, with its fan (in + rank; for a conv, the
        # channels, as kohya computes it) in place of kaiming-uniform's.
        nn.init.normal_(down, std=math.sqrt(2.0 / (in_dim + self.lora_dim)))
        del self.lora_down.weight  # the Parameter: the down layer computes with the buffer of the same name
        self.lora_down.register_buffer("weight", down)

    def down_parameters(self) -> list[torch.Tensor]:
        return []

    @torch.no_grad()
    def scale_delta(self, ratio: float) -> None:
        self.lora_up.weight.mul_(ratio)  # the frozen down matrix stays as it is


class LoRAFANetwork(LoRANetwork):
    KIND = "LoRA-FA"

    def _new_module(self, name: str, org_module: nn.Module, dim: int, alpha: float | None) -> LoRAFAModule:
        return LoRAFAModule(name, org_module, self.multiplier, dim, alpha, **self.dropouts)


def _args(kwargs: dict, neuron_dropout: float | None = None) -> lora.NetworkArgs:
    loraplus = sorted(k for k in kwargs if k.startswith("loraplus_"))
    if loraplus:
        raise ValueError(f"--network_args {', '.join(loraplus)}: networks.lora_fa trains only the up matrices (the "
                         "down ones are frozen), so LoRA+'s ratio between the two has nothing to act on; leave it "
                         "out, or use networks.lora")
    return lora.parse_network_args(kwargs, neuron_dropout, allowed=ARG_KEYS, module="networks.lora_fa")


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> LoRAFANetwork:
    """kohya's factory (see networks.lora.create_network)."""
    return lora.build_lora_network(LoRAFANetwork, multiplier, network_dim, network_alpha, text_encoder, unet,
                                   _args(kwargs, neuron_dropout))


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet,
                                weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs) -> tuple[LoRAFANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a LoRA file (any LoRA: to go on training it LoRA-FA style, its down matrices are the
    frozen ones once loaded)."""
    return lora.lora_network_from_weights(LoRAFANetwork, multiplier, file, text_encoder, unet, weights_sd,
                                          for_inference, _args(kwargs))
