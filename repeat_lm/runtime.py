"""Process-level settings for XLA and the host allocator, applied by the command line before JAX starts.

Both were found by profiling `repeat-lm bench train` on CPU (T5 v1.1 small, batch 8, 2 cores; docs/performance.md
measures each against its absence):
- The step's temporary buffers (~3 GB) are freed and allocated again every step. glibc gives XLA's worker threads
  their own arenas, which return freed memory to the kernel, so every step page-faulted its buffers in afresh
  (~800k minor faults and ~1.3 s of system time per step). One arena that keeps its memory removes that:
  4.3 s -> 3.6 s per step. Its memory is also asked for as transparent huge pages (kernels in THP 'madvise' mode
  give them only on request), fewer TLB misses over the step's 50 MB attention arrays: the attention core of one
  T5-small encoder layer (forward and backward) 50.5 -> 48.0 ms, the median of 4 processes each way, alternated;
  the whole step -27 ms, the median over 6 alternated pairs of processes (every pair faster with them).
- XLA:CPU's YNNPACK library fusions for dots and reductions, not elementwise ops. For reductions this also
  replaces XLA's own tree rewrite (each large reduce split into a reduce-window of 32 and a reduce), which cost
  ~0.3 s per step over softmax rows, Adafactor's factored statistics and the norms: 3.66 s (dots only) -> 3.31 s
  (dots and reductions), the same two processes one after the other; elementwise fusions never helped. They are
  added to XLA's default list ('+'), not written over it: the default's single-dot fusions are what keep a
  bfloat16 dot's operands in bfloat16. Written over ('dot,reduce'), every bfloat16 dot ran in float32: 5.22 s per
  bfloat16 step against 4.24 s with the same code otherwise, on a Zen 4 host with AVX512-BF16 (float32 steps
  4.93-5.16 s either way, two processes of each).
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import platform
import sys
from collections.abc import Mapping, MutableMapping

# CPU-backend flags only; GPU/TPU compilation ignores them.
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=+dot,+reduce",)

# One malloc arena, never trimmed and never unmapped: freed step buffers are reused without page faults. The cost
# is that the process keeps its peak heap, which a training process reaches again every step anyway. hugetlb=1:
# that heap in transparent huge pages (glibc >= 2.35; older ones ignore the name, kernels with THP off too).
HOST_MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                        "glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1")
# Set to 0 to keep the C library's default allocator behaviour.
HOST_MALLOC_ENV = "REPEAT_LM_HOST_MALLOC"


def configure_xla_flags(environ: MutableMapping[str, str] | None = None) -> None:
  """Append our defaults to XLA_FLAGS unless the user already set the same flag (theirs wins)."""
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
  if extra:
    environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def accelerator_plugin_installed() -> bool:
  """Whether a JAX GPU or TPU plugin is installed (then the host allocator is left alone: the step runs there)."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  spec = importlib.util.find_spec("jax_plugins")
  if spec is None or not spec.submodule_search_locations:
    return False
  return any(True for _ in pkgutil.iter_modules(list(spec.submodule_search_locations)))


def wants_host_malloc(environ: Mapping[str, str]) -> bool:
  """True for a CPU-only run on glibc Linux where the user has set neither GLIBC_TUNABLES nor the opt-out."""
  if environ.get(HOST_MALLOC_ENV, "1") == "0" or "GLIBC_TUNABLES" in environ:
    return False
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  platforms = environ.get("JAX_PLATFORMS", "")
  return platforms == "cpu" or (not platforms and not accelerator_plugin_installed())


def configure_host_allocator() -> None:
  """Re-execute this very command with HOST_MALLOC_TUNABLES when `wants_host_malloc` (glibc reads its tunables
  only at process start, and mallopt cannot set a trim threshold above 2 GiB). Call first thing in a script's
  entry point, never from library code: it replaces the process."""
  if "jax" in sys.modules or not wants_host_malloc(os.environ):
    return
  env = dict(os.environ, GLIBC_TUNABLES=HOST_MALLOC_TUNABLES)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)


def cli_command(*args: str) -> list[str]:
  """The command line that runs `repeat-lm ARGS` in a child process, on this process's Python; run it with
  child_env(), so that it imports this process's repeat_lm.

  `-P`: without it, `python -m` puts the working directory first on the module path, so a child started from any
  folder holding a `repeat_lm/` (another checkout, a stale clone) ran that code while the parent ran another: a
  launch from an old clone died in both children on an import its newer environment no longer had."""
  return [sys.executable, "-P", "-m", "repeat_lm.cli", *args]


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
  """`base` (default: this process's environment) with the folder this process imported repeat_lm from first on
  PYTHONPATH, where that is a source checkout (an editable install, or a checkout run with a bare python3): with `-P`
  the children would otherwise import whichever repeat_lm is installed, or none. An installed package's folder is
  site-packages, which the child finds anyway and which must not go before the standard library."""
  env = dict(os.environ if base is None else base)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.path.basename(root) not in ("site-packages", "dist-packages"):
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *rest])
  return env
