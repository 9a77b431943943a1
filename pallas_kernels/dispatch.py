"""The one dispatch convention for kernels (see docs/ARCHITECTURE.md).

Each op `f(x, ..., impl=None)` calls `resolve(impl)` and gets one of:

  "reference"  the pure-jnp reference (XLA) - the default off GPU
  "pallas"     the compiled Pallas-Triton kernel - the default on GPU
  "interpret"  the Pallas kernel in interpret mode (CPU tests of the kernel body)

Precedence: the `impl` argument, then the environment variable RECIS_KERNELS
(auto | reference | pallas | interpret), then "auto" (pallas on GPU, else reference).
"""

from __future__ import annotations

import os

import jax

ENV_VAR = "RECIS_KERNELS"
IMPLS = ("reference", "pallas", "interpret")


def on_gpu() -> bool:
    """True when the default backend is a GPU."""
    return jax.default_backend() == "gpu"


def resolve(impl: str | None = None) -> str:
    """Returns "reference", "pallas" or "interpret" for an op call.

    Raises ValueError for an unknown value, and for "pallas" off a GPU (compiled
    Pallas-Triton needs one; use "interpret" to run the kernel body on CPU).
    """
    choice = impl if impl is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.strip().lower()
    if choice == "auto":
        return "pallas" if on_gpu() else "reference"
    if choice not in IMPLS:
        raise ValueError(f"kernel impl must be one of auto, {', '.join(IMPLS)}; got {choice!r} "
                         f"(from {'impl=' if impl is not None else ENV_VAR})")
    if choice == "pallas" and not on_gpu():
        raise ValueError("kernel impl 'pallas' needs a GPU backend; use 'interpret' on CPU")
    return choice
