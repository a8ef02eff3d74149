"""Shared core of the training suite (see README.md for the module map)."""

import logging

# bitsandbytes warns on import, on CPUs with AVX-512 BF16, that an optional kernel package is missing; diffusers
# imports bitsandbytes whenever it is installed, so every command would print it. It is harmless: the 8-bit
# optimizers do not use that kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
