"""Test-wide setup: 8 virtual CPU devices so sharding over a real (data x model) mesh is exercised."""

import asyncio
import atexit
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Must happen before jax is imported anywhere. LLVM at -O0: the tests' programs are tiny, so compiling them is most
# of their time (a tiny T5's training step: 3.5 s at the default level, 2.1 s at 0), and their dots run in
# precompiled libraries either way. The whole suite on the 2-core CI host: 670 s -> 592 s.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session, inherited by the subprocesses the tests start (pytest-xdist's
# workers, `repeat-lm train` runs of a sweep, the launcher's processes, the demo): many tests compile the same tiny programs, and on the 2-core
# CI host the first compilation of a tiny T5's step takes ~3.5 s where a cache hit takes ~0.2 s (with the benchmark
# tests' smaller probe, tests/bench/conftest.py, the suite went 784 s -> 670 s). Removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="repeat_lm_test_jax_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


def _pin_xdist_worker():
  """Give each pytest-xdist worker its own share of the CPUs (children inherit it), before XLA sizes its thread pool.

  XLA's CPU client starts a thread pool as wide as the CPUs the process may use, and its threads wait by spinning:
  two workers each spinning over both of the CI host's 2 cores slowed one another down far more than sharing them
  costs (tests/train/test_trainer.py: 138 s alone, ~300 s beside the other worker; the whole suite with `-n 2`:
  762 s -> 445 s). Affinity, not a flag such as --xla_cpu_multi_thread_eigen=false, because that flag changes the
  compiled code (bfloat16 dots become float32 ones, which tests/models/test_cpu_layouts.py pins)."""
  worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
  if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 0
          and hasattr(os, "sched_setaffinity")):
    return
  cpus = sorted(os.sched_getaffinity(0))
  # A worker that replaces a crashed one gets the next name (gw2 of 2) and share N % count, perhaps a live worker's:
  # cpus[N::count] would be empty, which sched_setaffinity refuses, and the replacement died importing this file.
  index, count = int(worker[2:]) % int(count), int(count)
  if count <= len(cpus):
    os.sched_setaffinity(0, cpus[index::count])


_pin_xdist_worker()

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the clone: real C4 sample and the T5 vocabulary. Absent on some machines; tests then skip.
SHARED = REPO_ROOT.parent / "shared"
C4_SAMPLE = SHARED / "data" / "c4" / "c4-sample.00000-of-00001.json.gz"
T5_VOCAB = SHARED / "data" / "vocab" / "t5_cc_all_32000.spm.model"


@pytest.fixture
def c4_sample() -> Path:
  if not C4_SAMPLE.exists():
    pytest.skip(f"C4 sample not found at {C4_SAMPLE} (../shared is absent on this machine)")
  return C4_SAMPLE


@pytest.fixture
def t5_vocab_path() -> Path:
  if not T5_VOCAB.exists():
    pytest.skip(f"T5 vocabulary not found at {T5_VOCAB} (../shared is absent on this machine)")
  return T5_VOCAB


@pytest.fixture
def hf_libraries() -> None:
  """Skips a test where the `hf` extra (transformers, safetensors) is not installed, as on a core-only install."""
  for name in ("transformers", "safetensors"):
    pytest.importorskip(name, reason=f"{name} is not installed (the hf extra: pip install -e '.[hf]')")


class FailingReads:
  """Orbax's shard reads with the first failing at once and the others slower, as a truncated file fails one read
  while the rest are in flight: `started` / `finished` count them."""

  def __init__(self, monkeypatch):
    from orbax.checkpoint._src.serialization import serialization  # pylint: disable=protected-access
    real_read = serialization._read_shard  # pylint: disable=protected-access
    self.started, self.finished = [], []

    async def read(*args, **kwargs):
      self.started.append(1)
      if len(self.started) == 1:
        raise ValueError('OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database\nat local file ...')
      await asyncio.sleep(0.2)
      shard = await real_read(*args, **kwargs)
      self.finished.append(1)
      return shard
    monkeypatch.setattr(serialization, "_read_shard", read)
    self._monkeypatch = monkeypatch
    self.unsettle()

  def unsettle(self):
    """Orbax's own event-loop runner back in place: a save settles every later loop of the process (checkpoint.
    _settle_orbax_loops), which would hide a restore that settled_reads no longer covers. Call after saving."""
    from repeat_lm.train import checkpoint  # pylint: disable=import-outside-toplevel
    if checkpoint.ORBAX_RUN_SYNC is not None:
      self._monkeypatch.setattr(checkpoint.orbax_asyncio, "_run_sync_via_new_loop", checkpoint.ORBAX_RUN_SYNC)

  def assert_none_left(self):
    """Every other read ran to its end, and nothing left behind reports an error once collected."""
    assert len(self.started) > 1 and len(self.finished) == len(self.started) - 1
    unraisable, hook = [], sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
      gc.collect()
    finally:
      sys.unraisablehook = hook
    assert not unraisable


@pytest.fixture
def failing_reads(monkeypatch) -> FailingReads:
  return FailingReads(monkeypatch)
