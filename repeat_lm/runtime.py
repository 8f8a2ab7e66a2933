"""Process-level XLA settings, applied by the command line before JAX starts its backends."""

from __future__ import annotations

import os

# On CPU, route matmuls and their fused neighbours through oneDNN instead of XLA's default Eigen kernels: measured
# in `repeat-lm bench train` (docs/performance.md) it is what lets the CPU step beat the PyTorch peer. The flag
# only concerns the CPU backend; GPU/TPU compilation ignores it.
CPU_FLAGS = ("--xla_cpu_experimental_onednn_custom_call=true",)


def configure_xla_flags(environ: dict[str, str] | None = None) -> None:
  """Append our defaults to XLA_FLAGS unless the user already set the same flag (theirs wins)."""
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
  if extra:
    environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
