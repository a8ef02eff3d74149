"""A trained LoRA-layout network (networks.lora, lora_fa, dylora) in diffusers' own LoRA layout
(`pytorch_lora_weights.safetensors`), for users of diffusers' training examples (`--save_lora_format diffusers`).

diffusers writes PEFT's layout: `<component>.<module path>.lora_A.weight` (the down projection) and `.lora_B.weight`
(the up projection), components named as the pipeline names them (`unet`, `text_encoder`, `text_encoder_2`), module
paths as they are in the live diffusers / transformers models, and no alpha: a file without adapter metadata is
read with scale 1. So each module's kohya scale (alpha / rank) is folded into lora_B, and the paths are read from
the models the network is applied to: the same keys diffusers' `save_lora_weights` writes for the same modules.
"""

from __future__ import annotations

import torch


def diffusers_lora_state_dict(network, text_encoders: list[torch.nn.Module], unet: torch.nn.Module,
                              component_names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`network`'s weights in diffusers' layout. `text_encoders` / `unet`: the models it was created for, and
    `component_names` the pipeline's names of the text encoders (family order, e.g. ["text_encoder",
    "text_encoder_2"])."""
    paths = {id(module): f"unet.{name}" for name, module in unet.named_modules()}
    for encoder, component in zip(text_encoders, component_names):
        paths.update({id(module): f"{component}.{name}" for name, module in encoder.named_modules()})
    out = {}
    for lora in network.loras:
        path = paths.get(id(lora.org_module))
        if path is None:
            raise ValueError(f"{lora.lora_name}: its layer is not in the models given; build the diffusers file "
                             "from the models the network was applied to")
        down, up = (t.detach() for t in lora.factors())  # LoRA, LoRA-FA and DyLoRA (full rank) alike
        folded_up = up.float() * (float(lora.alpha) / lora.lora_dim)  # diffusers reads a file without alpha at 1
        for key, tensor in ((f"{path}.lora_A.weight", down), (f"{path}.lora_B.weight", folded_up)):
            out[key] = tensor.to("cpu", dtype or down.dtype).contiguous()
    return out
