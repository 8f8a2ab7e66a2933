"""Hugging Face's PyTorch T5 training step with the same dimensions, batch, lengths and optimizer family.

Needs the `bench` extra (torch, transformers).
"""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np

from repeat_lm import bench
from repeat_lm.train import flops

# repeat_lm activation dtypes the peer runs under torch.autocast (by torch dtype name); float32 runs as it is.
AUTOCAST_DTYPES = {"bfloat16": "bfloat16", "float16": "float16"}
INSTALL_HINT = ("--compare=hf needs PyTorch and transformers: pip install -e '.[bench]' "
                "(or pip install torch==2.13.0 transformers==5.24.0).")


def _import():
  try:
    import torch
    import transformers
  except ImportError as e:
    raise RuntimeError(INSTALL_HINT) from e
  return torch, transformers


def require_torch() -> None:
  """Raise RuntimeError with the install hint unless torch and transformers import."""
  _import()


def hf_config(config):
  """transformers.T5Config equivalent to a repeat_lm T5Config (one mapping for bench and export: interop/hf.py)."""
  _import()  # the bench's install hint when torch or transformers is missing
  from repeat_lm.interop import hf  # pylint: disable=import-outside-toplevel
  return hf.hf_config(config)


def check_same_model(config) -> None:
  """Raise unless T5ForConditionalGeneration can be the same model: dense, every layer its own parameters, one
  dropout rate in every place (Hugging Face's T5 has a single `dropout_rate`, which hf_config gives it) drawn per
  element, no DropPath (Hugging Face's T5 has none), and an MLP it can express."""
  if config.moe is not None or config.param_share not in ("none", 1):
    raise ValueError("--compare=hf compares dense T5 without parameter sharing (T5ForConditionalGeneration); this "
                     "model has MoE layers or shared parameters, which that peer would silently leave out. Use "
                     "`repeat-lm bench moe` for MoE.")
  rates = {place: config.dropout_rate_for(place) for place in ("attention", "hidden", "mlp")}
  if config.droppath_rate or any(rate != config.dropout_rate for rate in rates.values()) or (
      config.dropout_rate and config.dropout_broadcast_length):
    raise ValueError(f"--compare=hf: Hugging Face's T5 applies one dropout rate everywhere and has no DropPath, and "
                     f"its peer would run dropout_rate={config.dropout_rate} in every place; this model has "
                     f"{', '.join(f'{p} dropout {r}' for p, r in rates.items())} and DropPath "
                     f"{config.droppath_rate}, masks {'shared along' if config.dropout_broadcast_length else 'per'} "
                     "position. Set DROPOUT_RATE alone (no per-place overrides), DROPPATH_RATE=0 and, with dropout, "
                     "--gin.t5.T5Config.dropout_broadcast_length=False (Hugging Face draws every element).")
  from repeat_lm.interop import hf  # pylint: disable=import-outside-toplevel
  hf.feed_forward_proj(config.mlp_activations)  # raises for an MLP Hugging Face's T5 cannot express


def check_comparable(config) -> None:
  """check_same_model, and that repeat_lm's step runs on the CPU: the peer runs PyTorch on the host, and against a
  GPU step its ratio would compare two machines. Asked in the benchmark's process, which has a JAX backend running
  (the peer's process starts none)."""
  check_same_model(config)
  if jax.default_backend() != "cpu":
    raise ValueError(f"--compare=hf runs Hugging Face's step on the CPU, and this step on {jax.default_backend()}; "
                     "compare on a CPU host (JAX_PLATFORMS=cpu), where both run on the same cores.")


def peer_model(config):
  """T5ForConditionalGeneration with repeat_lm's parameters: transformers 5 ties lm_head to the embedding whatever
  the config says (T5Config forces tie_word_embeddings=True; only from_pretrained unties, when a checkpoint holds
  both), so a T5 v1.1 peer built from a config had one V x D matrix fewer to differentiate and update (24.7M of
  T5-Base's 247.6M parameters). Untied here, as in T5 v1.1 and as repeat_lm trains it."""
  torch, transformers = _import()
  check_same_model(config)
  model = transformers.T5ForConditionalGeneration(hf_config(config))
  if not config.logits_via_embedding:
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    model.config.tie_word_embeddings = False
  return model


class _TorchStep:
  """T5ForConditionalGeneration + transformers' Adafactor (T5 settings: factored, decay -0.8, clip 1.0).

  Activations in bfloat16 or float16 (repeat_lm's T5Config.dtype) run the forward pass under torch.autocast, the
  mixed precision PyTorch users train with: float32 parameters and optimizer, matmuls in the low precision.
  """

  def __init__(self, config, bench_cfg, threads: int):
    torch, transformers = _import()
    autocast = AUTOCAST_DTYPES.get(str(config.dtype))
    self.matmul_dtype = autocast or "float32"  # what its matmuls multiply in, and so its probe
    self._precision = ((lambda: torch.autocast("cpu", dtype=getattr(torch, autocast))) if autocast
                       else contextlib.nullcontext)
    torch.set_num_threads(threads)
    torch.manual_seed(bench_cfg.seed)
    self.model = peer_model(config).train()
    from transformers.optimization import Adafactor
    self.optimizer = Adafactor(self.model.parameters(), lr=1e-3, scale_parameter=True, relative_step=False,
                               warmup_init=False, decay_rate=-0.8, clip_threshold=1.0)
    rng = np.random.default_rng(bench_cfg.seed)
    b = bench_cfg.batch_size
    self.inputs = torch.from_numpy(rng.integers(2, config.vocab_size, (b, bench_cfg.inputs_length)))
    self.labels = torch.from_numpy(rng.integers(2, config.vocab_size, (b, bench_cfg.targets_length)))

  def step(self) -> float:
    with self._precision():
      loss = self.model(input_ids=self.inputs, labels=self.labels).loss
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.step()
    return time.perf_counter() - start

  def matmul_rate(self, sizes: tuple[int, ...], repeats: int) -> float:
    """torch_matmul_rate in the dtype this step's matmuls run in (the autocast dtype, else float32)."""
    torch, _ = _import()
    return torch_matmul_rate(getattr(torch, self.matmul_dtype), sizes, repeats)


def torch_matmul_rate(dtype, sizes: tuple[int, ...], repeats: int) -> float:
  """FLOP/s of torch.matmul on square `dtype` matrices, the best over sizes and runs: the peer's own peak, probed as
  repeat_lm's (train/flops.matmul_rate: the same sizes, the same fastest_square_product).

  The two frameworks multiply with different libraries, whose rates differ by processor: PyTorch's float32 matmul is
  MKL's sgemm, and on a 2-core family-26 EPYC host (Zen 5) it ran at 0.21 TFLOP/s where XLA's (YNNPACK) ran at 0.51
  and oneDNN's float32 linear (torch._C._nn.mkldnn_linear, which T5's nn.Linear does not use in float32) at 0.49;
  on a family-25 EPYC (Zen 4) Hugging Face's step reached about 69% of XLA's probe. So a ratio of tokens/s holds for
  one processor, and the report prints both probes beside it.
  """
  torch, _ = _import()

  def product_of(n):
    a = torch.rand((n, n), dtype=dtype)
    return lambda: torch.matmul(a, a)
  return flops.fastest_square_product(product_of, sizes, repeats)


def _serve(conn, config, bench_cfg, threads: int) -> None:
  """The peer process: build the step, then answer ('run', n) with the seconds n steps took and ('probe', (sizes,
  repeats)) with its matmul rate, until None; a failure is answered ('error', what failed) and ends the process."""
  try:
    step = _TorchStep(config, bench_cfg, threads)
    conn.send(("ready", None))
    while (message := conn.recv()) is not None:
      kind, arg = message
      conn.send(("done", step.run(arg) if kind == "run" else step.matmul_rate(*arg)))
  except Exception as e:  # pylint: disable=broad-except
    conn.send(("error", f"{type(e).__name__}: {e}"))


def _how_it_ended(exitcode: int | None) -> str:
  """multiprocessing's exit code in words: negative is the signal that ended the process, None still running."""
  if exitcode is None:
    return "stopped answering"
  if exitcode < 0:
    return f"was killed by signal {-exitcode}" + (" (SIGKILL, which the kernel's out-of-memory killer sends)"
                                                  if exitcode == -9 else "")
  return f"exited with status {exitcode}"


class HfStep:
  """Hugging Face's training step, run in its own process and driven round by round from the benchmark.

  Its own process, so the two frameworks never share a heap: one process' allocations would otherwise fragment the
  other's (repeat_lm's step times varied 3.6-6.3 s when both ran in one process). The peer inherits the
  environment, including the host allocator settings (runtime.py), so both run under the same conditions, one at a
  time. Raises RuntimeError with the install hint when torch or transformers is missing.
  """

  def __init__(self, config, bench_cfg, threads: int | None = None):
    _import()  # fail here, with the install hint, before starting a process
    import multiprocessing
    self.threads = threads or bench.usable_cpus()  # as many threads as XLA's pool gets, no more
    ctx = multiprocessing.get_context("spawn")  # never fork a process that has started JAX's threads
    self._conn, child = ctx.Pipe()
    self._process = ctx.Process(target=_serve, args=(child, config, bench_cfg, self.threads), daemon=True)
    self._process.start()
    self._ask(None, "start")

  def run(self, steps: int) -> float:
    """Seconds the peer took for `steps` steps (timed inside the peer, so the pipe is not counted)."""
    return self._ask(("run", steps), f"run {steps} step{'' if steps == 1 else 's'}")

  def matmul_rate(self, sizes: tuple[int, ...], repeats: int) -> float:
    """The peer's torch.matmul FLOP/s in the dtype its step multiplies in (torch_matmul_rate), probed in its
    process."""
    return self._ask(("probe", (tuple(sizes), repeats)), "probe its matmul rate")

  def _ask(self, message, doing: str):
    """Send `message` (None: only wait, for the start) and return the peer's answer; RuntimeError naming the cause
    where the peer failed or its process ended (a bare EOFError before: e.g. the kernel's out-of-memory killer
    ending the peer mid-round)."""
    try:
      if message is not None:
        self._conn.send(message)
      status, detail = self._conn.recv()
    except (EOFError, OSError):
      self._process.join(timeout=10)
      how = _how_it_ended(self._process.exitcode)
      self.close()
      raise RuntimeError(f"The Hugging Face peer's process {how} when asked to {doing}. Run without --compare=hf, "
                         "or free memory (a smaller --batch_size needs less)") from None
    if status == "error":
      self.close()
      raise RuntimeError(f"The Hugging Face peer failed to {doing}: {detail}")
    return detail

  def close(self) -> None:
    if self._process.is_alive():
      try:
        self._conn.send(None)
      except OSError:  # the peer has closed its end (it failed)
        pass
      self._process.join(timeout=30)
    if self._process.is_alive():
      self._process.kill()
