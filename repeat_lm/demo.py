"""`repeat-lm demo`: the token crisis in minutes on a CPU: fresh data vs repeated data vs repeated data with dropout.

Three runs of one small T5 read the same token budget of the default local corpus (Wikipedia text from the gensim
wheel) and are evaluated on the same validation split (its held-out articles, never in any training subset):
  fresh             2^19 unique tokens, read once
  repeated          the first 2^14 tokens, read 32 times (the same 2^19-token budget)
  repeated_dropout  the repeated run with dropout
Each run is an ordinary `trainer.train` call configured through the shipped gin files plus bindings (written to the
report, so `repeat-lm train` repeats any run). The demo writes report.{html,md}, the PNG plots and summary.json into
`--out`; every sentence of the report is computed from the measured numbers. Running it again with the same `--out`
reuses finished runs and resumes unfinished ones from their checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from repeat_lm import files

GIN_FILES = ("gin/models/t5_1_1_tiny.gin", "gin/runs/pretrain.gin")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that shapes the three runs; stored with each run so a changed setting is never silently resumed.

  The defaults were chosen by trying them (docs/demo.md): 2^14 tokens x 32 epochs overfits within the budget (2^15 x
  16 did not, at this size), the cosine schedule makes the final evaluation a settled value rather than a sample of
  the last steps' noise, and the model is the tiny gin widened to d_model 128 (the 64-wide one memorises the
  repeated tokens less, for about 30% less time).
  """
  budget_log2: int = 19  # tokens every run reads: the fresh run reads 2^19 of the corpus's ~670K once
  repeated_log2: int = 14  # unique tokens of the repeated runs, read 2^(budget - repeated) times
  dropout_rate: float = 0.2
  inputs_length: int = 128
  targets_length: int = 32
  batch_size: int = 8  # 464 steps of the budget: more updates learn more from 2^19 tokens than larger batches
  eval_batch_size: int = 32
  eval_steps: int = 8  # 256 of the 374 validation examples at 128/32
  evals: int = 16  # evaluation points per run (also the checkpoint period)
  learning_rate_factors: str = "constant * cosine_decay"  # optim.make_schedule, over the run's steps
  warmup_steps: int = 0  # Adafactor's relative updates need no warm-up at this rate
  base_learning_rate: float = 0.05
  # t5.T5Config bindings on top of the tiny model gin (2+2 layers, d_model 64, d_ff 128, 4 heads x 16).
  model: tuple[tuple[str, object], ...] = (("emb_dim", 128), ("mlp_dim", 256), ("head_dim", 32))
  steps: int | None = None  # None: every run reads the whole budget


FULL = Settings()
# Tests: a few dozen steps of a 1+1-layer tiny model; only the plumbing is checked, not the conclusions.
QUICK = Settings(budget_log2=14, repeated_log2=11, inputs_length=64, targets_length=16, eval_batch_size=8,
                 eval_steps=2, evals=3, model=(("num_encoder_layers", 1), ("num_decoder_layers", 1)))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  name: str
  label: str
  unique_log2: int
  dropout: bool


def run_specs(s: Settings) -> list[RunSpec]:
  epochs = 2 ** (s.budget_log2 - s.repeated_log2)
  return [
      RunSpec("fresh", f"fresh: 2^{s.budget_log2} unique tokens x 1 epoch", s.budget_log2, False),
      RunSpec("repeated", f"repeated: 2^{s.repeated_log2} tokens x {epochs} epochs", s.repeated_log2, False),
      RunSpec("repeated_dropout", f"repeated + dropout {s.dropout_rate:g}", s.repeated_log2, True),
  ]


def task_name(s: Settings, run: RunSpec) -> str:
  # Named by the scheme of docs/data.md: source wiki, its 8K vocabulary, T5 span corruption, D = 2^k, E = 2^e.
  return f"repeat_lm.wiki.wiki8k.span.d{run.unique_log2}.e{s.budget_log2 - run.unique_log2}"


def gin_bindings(s: Settings, run: RunSpec, model_dir: Path, steps: int, seed: int) -> list[str]:
  period, log_period = eval_periods(s, steps)
  return [
      f"MODEL_DIR = {str(model_dir)!r}",
      f"TRAIN_STEPS = {steps}",
      f"MIXTURE_OR_TASK_NAME = {task_name(s, run)!r}",
      f"TASK_FEATURE_LENGTHS = {{'inputs': {s.inputs_length}, 'targets': {s.targets_length}}}",
      f"BATCH_SIZE = {s.batch_size}",
      f"EVAL_BATCH_SIZE = {s.eval_batch_size}",
      f"RANDOM_SEED = {seed}",
      f"DROPOUT_RATE = {s.dropout_rate if run.dropout else 0.0}",
      f"trainer.train.log_period = {log_period}",
      f"trainer.train.eval_period = {period}",
      f"trainer.train.eval_steps = {s.eval_steps}",
      f"optim.make_schedule.factors = {s.learning_rate_factors!r}",
      f"optim.make_schedule.warmup_steps = {s.warmup_steps}",
      f"optim.make_schedule.total_steps = {steps}",
      f"optim.make_schedule.base_learning_rate = {s.base_learning_rate}",
      f"checkpoint.CheckpointConfig.period = {period}",
      "checkpoint.CheckpointConfig.keep = 1",
      *(f"t5.T5Config.{k} = {v!r}" for k, v in s.model),
  ]


def eval_periods(s: Settings, steps: int) -> tuple[int, int]:
  """(evaluation period, logging period): about `s.evals` evaluations, four logs between them, and every evaluation
  on a logging step, so its tokens seen are exact rather than interpolated (the last step does both anyway)."""
  log_period = max(1, steps // s.evals // 4)
  return 4 * log_period, log_period


def budget_steps(s: Settings, specs: Sequence[RunSpec]) -> int:
  """Full batches every run can read: the budget in steps (the runs' last examples of an epoch are shorter)."""
  from repeat_lm.data import pipeline, tasks
  steps = []
  for run in specs:
    cfg = pipeline.DatasetConfig(tasks.ensure_registered(task_name(s, run)),
                                 {"inputs": s.inputs_length, "targets": s.targets_length}, batch_size=s.batch_size)
    steps.append(pipeline.example_stream(cfg).total_examples // s.batch_size)
  return min(steps)


# ---- progress ----

class _Progress(threading.Thread):
  """Prints 'run i/3, step, ETA' lines while a run trains, read from its metrics.jsonl (the trainer's own output)."""

  def __init__(self, index: int, count: int, name: str, model_dir: Path, steps: int, later_runs: int,
               demo_start: float, every_s: float = 10.0):
    super().__init__(daemon=True)
    self.index, self.count, self.name, self.steps, self.later_runs = index, count, name, steps, later_runs
    self.path, self.demo_start, self.every_s = model_dir / "metrics.jsonl", demo_start, every_s
    self.start_time, self.stop_event = time.perf_counter(), threading.Event()
    self.first: tuple[int, float] | None = None  # (step, time) of the first record this process saw

  def run(self):
    last_print = 0.0
    while not self.stop_event.wait(1.0):
      if time.perf_counter() - last_print >= self.every_s and self.report():
        last_print = time.perf_counter()

  def report(self) -> bool:
    step, loss = _latest(self.path)
    if step is None:
      return False
    now = time.perf_counter()
    if self.first is None or step < self.first[0]:
      self.first = (step, now)
    eta = ""
    if step > self.first[0]:
      per_step = (now - self.first[1]) / (step - self.first[0])
      # Later runs: the same step time plus the start-up (compilation, data) this run needed.
      startup = self.first[1] - self.start_time
      left = per_step * (self.steps - step + self.steps * self.later_runs) + startup * self.later_runs
      eta = f", ETA {_clock(left)}"
    loss_text = f", eval loss {loss:.3f}" if loss is not None else ""
    _say(f"run {self.index}/{self.count} ({self.name}): step {step}/{self.steps}{loss_text}; "
         f"elapsed {_clock(now - self.demo_start)}{eta}")
    return True

  def stop(self):
    self.stop_event.set()
    self.join()


def _latest(path: Path) -> tuple[int | None, float | None]:
  if not path.exists():
    return None, None
  step, loss = None, None
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line being written
      continue
    step = max(step or 0, int(record["step"]))
    if "eval/loss" in record:
      loss = float(record["eval/loss"])
  return step, loss


def _clock(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  return f"{seconds // 60}:{seconds % 60:02d}"


def _say(text: str) -> None:
  try:  # above a trainer progress bar when there is one
    from tqdm import tqdm
    tqdm.write(f"[demo] {text}", file=sys.stderr)
  except ImportError:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


# ---- runs ----

def _run_state(model_dir: Path, steps: int) -> str:
  """'done' when the checkpoint at `steps` and the final evaluation exist, 'partial' with any checkpoint, else 'new'."""
  ckpts = files.checkpoint_steps(model_dir)
  if ckpts and max(ckpts) >= steps and _latest_eval_step(model_dir) == steps:
    return "done"
  return "partial" if ckpts else "new"


def _latest_eval_step(model_dir: Path) -> int | None:
  # results.read_metrics skips a line cut mid-write (a killed `repeat-lm eval` appending to a finished run): parsed
  # here line by line, it stopped every rerun with a JSONDecodeError that named no file.
  from repeat_lm.analysis import results
  steps = [r["step"] for r in results.read_metrics(model_dir) if "eval/loss" in r]
  return max(steps) if steps else None


def _check_settings(model_dir: Path, record: dict) -> None:
  path = model_dir / "demo_run.json"
  if path.exists():
    old = json.loads(path.read_text())
    if old.get("settings") != record["settings"]:
      stored, given = old.get("settings") or {}, record["settings"]
      changed = {k: (stored.get(k), given.get(k)) for k in sorted({*stored, *given}) if stored.get(k) != given.get(k)}
      raise ValueError(f"{model_dir} holds a demo run with other settings (stored -> given: {changed}); use another "
                       "--out or delete that directory.")


def _train_and_record(s: Settings, run: RunSpec, model_dir: Path, record: dict, steps: int, seed: int) -> None:
  """train_run, with the settings and the training time (summed over resumes) in MODEL_DIR/demo_run.json."""
  path = model_dir / "demo_run.json"
  wall = float(json.loads(path.read_text()).get("train_wall_s", 0.0)) if path.exists() else 0.0
  model_dir.mkdir(parents=True, exist_ok=True)
  _replace_json(path, {**record, "train_wall_s": wall})  # settings first: see _check_settings
  wall += train_run(s, run, model_dir, steps, seed)
  _replace_json(path, {**record, "train_wall_s": wall})


def _replace_json(path: Path, record: dict) -> None:
  """Replaced whole: a file cut by a kill or a full disk mid-write stopped every rerun with a JSONDecodeError (it is
  read before anything trains) until deleted, its settings and train time with it."""
  files.atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def train_run(s: Settings, run: RunSpec, model_dir: Path, steps: int, seed: int) -> float:
  """Train (or resume) one run through gin and the project's trainer; returns the seconds it took."""
  from repeat_lm import gin_utils
  from repeat_lm.train import trainer
  start = time.perf_counter()
  gin_utils.parse(list(GIN_FILES), gin_bindings(s, run, model_dir, steps, seed))
  try:
    gin_utils.call_configured(trainer.train)
  finally:
    import gin
    gin.clear_config()
  return time.perf_counter() - start


@contextlib.contextmanager
def compilation_cache(path: Path):
  """JAX's persistent compilation cache in `path` while the demo runs, unless one is configured already.

  The trainer builds its jitted functions per call, so without it each run compiles everything again: the fresh
  and repeated runs compile identical programs, the evaluation step is the same in all three, and a rerun (another
  seed) compiles nothing. The previous configuration is restored afterwards.
  """
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  if jax.config.jax_compilation_cache_dir:
    yield
    return
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # many small programs add up
  cc.reset_cache()
  try:
    yield
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
    cc.reset_cache()


# ---- results ----

def summarise_run(run: RunSpec, model_dir: Path, settings: Settings) -> dict:
  from repeat_lm.analysis import results
  handle = results.Run(run=run.name, status="done", model_dir=str(model_dir))
  loss, acc = results.load_curve(handle, "eval/loss"), results.load_curve(handle, "eval/accuracy")
  if loss is None or acc is None:
    raise RuntimeError(f"{model_dir}/metrics.jsonl has no evaluation: the run did not finish.")
  train = [r for r in results.read_metrics(model_dir) if "train/tokens_seen" in r]
  tokens = float(train[-1]["train/tokens_seen"])
  best = int(min(range(len(loss.value)), key=lambda i: loss.value[i]))
  unique = 2 ** run.unique_log2
  return {
      "name": run.name, "label": run.label, "model_dir": str(model_dir),
      "dropout_rate": settings.dropout_rate if run.dropout else 0.0,
      "unique_tokens": unique, "epochs": tokens / unique, "tokens_seen": tokens, "steps": int(train[-1]["step"]),
      "final_eval_loss": float(loss.value[-1]), "best_eval_loss": float(loss.value[best]),
      "final_eval_accuracy": float(acc.value[-1]), "best_eval_accuracy": float(acc.value.max()),
      "best_step": int(loss.step[best]), "best_tokens_seen": float(loss.tokens_seen[best]),
      "final_train_loss": float(train[-1]["train/loss"]),
      "curves": {"step": loss.step.tolist(), "tokens_seen": loss.tokens_seen.tolist(),
                 "eval_loss": loss.value.tolist(), "eval_accuracy": acc.value.tolist(),
                 "train_step": [r["step"] for r in train], "train_tokens_seen": [r["train/tokens_seen"] for r in train],
                 "train_loss": [r["train/loss"] for r in train]},
  }


def _worse(delta: float) -> str:
  return "higher (worse)" if delta > 0 else "lower (better)" if delta < 0 else "equal"


def _train_loss_at(run: dict, step: int) -> float:
  """The logged training loss at the last logging step at or before `step` (evaluations fall on logging steps)."""
  c = run["curves"]
  return float(next(loss for s, loss in zip(reversed(c["train_step"]), reversed(c["train_loss"])) if s <= step))


def _overfitting(run: dict) -> str:
  rise = run["final_eval_loss"] - run["best_eval_loss"]
  at = f"step {run['best_step']}, epoch {run['best_tokens_seen'] / run['unique_tokens']:.1f}"
  if run["best_step"] >= run["steps"] or rise <= 0:
    return f"its validation loss was lowest at the end ({run['best_eval_loss']:.4f}, {at}): no overfitting within " \
           "the budget"
  train_then, train_end = _train_loss_at(run, run["best_step"]), run["final_train_loss"]
  trend = "fell" if train_end < train_then else "rose"
  return (f"its validation loss was lowest at {at} ({run['best_eval_loss']:.4f}) and then rose by {rise:.4f} to the "
          f"end, while its training loss {trend} from {train_then:.4f} to {train_end:.4f}"
          + (": it overfit the repeated tokens" if trend == "fell" else ""))


def findings(runs: dict[str, dict], seed: int) -> list[str]:
  """Sentences that state what the runs show; every number and every direction word comes from `runs`."""
  fresh, rep, drop = runs["fresh"], runs["repeated"], runs["repeated_dropout"]
  gap = rep["final_eval_loss"] - fresh["final_eval_loss"]
  acc_gap = rep["final_eval_accuracy"] - fresh["final_eval_accuracy"]
  out = [
      f"Same budget, different data: repeating {rep['unique_tokens']} tokens {rep['epochs']:.1f} times ended at "
      f"validation loss {rep['final_eval_loss']:.4f}, {abs(gap):.4f} {_worse(gap)} than reading "
      f"{fresh['tokens_seen']:.0f} fresh tokens once ({fresh['final_eval_loss']:.4f}); validation accuracy "
      f"{rep['final_eval_accuracy']:.4f} against {fresh['final_eval_accuracy']:.4f} ({acc_gap:+.4f}).",
      f"Repeated run: {_overfitting(rep)}.",
      f"Fresh run: {_overfitting(fresh)}.",
  ]
  delta = drop["final_eval_loss"] - rep["final_eval_loss"]
  text = (f"Dropout {drop['dropout_rate']:g} on the repeated data {'helped' if delta < 0 else 'did not help'}: final "
          f"validation loss {drop['final_eval_loss']:.4f} against {rep['final_eval_loss']:.4f} without it "
          f"({delta:+.4f})")
  if delta < 0 < gap:
    text += f", recovering {min(-delta / gap, 1.0):.0%} of the gap to the fresh run"
  drop_acc = drop["final_eval_accuracy"] - rep["final_eval_accuracy"]
  out.append(f"{text}; validation accuracy {drop['final_eval_accuracy']:.4f} ({drop_acc:+.4f}). With dropout, "
             f"{_overfitting(drop)}.")
  out.append(f"These are single runs (seed {seed}); `repeat-lm demo --seed=N` with another N shows how much of each "
             "difference is seed noise.")
  return out


def _plots(out: Path, runs: list[dict]) -> list[Path]:
  from repeat_lm.analysis import plots
  colors = plots.colors(len(runs))
  series = lambda key: [plots.Series(r["curves"]["tokens_seen"], r["curves"][key], r["label"], c, "-o")  # noqa: E731
                        for r, c in zip(runs, colors)]
  paths = [
      plots.save(out / "eval_loss.png", series("eval_loss"), title="Validation loss (held-out articles)",
                 xlabel="tokens seen", ylabel="loss"),
      plots.save(out / "eval_accuracy.png", series("eval_accuracy"), title="Validation token accuracy",
                 xlabel="tokens seen", ylabel="accuracy"),
      plots.save(out / "train_loss.png",
                 [plots.Series(r["curves"]["train_tokens_seen"], r["curves"]["train_loss"], r["label"], c, "-")
                  for r, c in zip(runs, colors)],
                 title="Training loss (with dropout on for the dropout run)", xlabel="tokens seen", ylabel="loss"),
  ]
  return paths


_COLUMNS = ("name", "unique_tokens", "epochs", "tokens_seen", "final_eval_loss", "best_eval_loss",
            "final_eval_accuracy", "best_eval_accuracy", "best_step")


def write_outputs(out: Path, s: Settings, seed: int, steps: int, runs: list[dict], wall_time_s: float,
                  commands: dict[str, list[str]]) -> dict:
  from repeat_lm.analysis import report
  by_name = {r["name"]: r for r in runs}
  summary = {
      "runs": [{k: r[k] for k in (*_COLUMNS, "dropout_rate", "steps", "reused", "train_wall_s", "model_dir")}
               for r in runs],
      "repeated_minus_fresh_final_eval_loss": by_name["repeated"]["final_eval_loss"] -
                                              by_name["fresh"]["final_eval_loss"],
      "dropout_minus_repeated_final_eval_loss": by_name["repeated_dropout"]["final_eval_loss"] -
                                                by_name["repeated"]["final_eval_loss"],
      "wall_time_s": wall_time_s, "seed": seed, "steps": steps, "budget_tokens": 2 ** s.budget_log2,
      "settings": _settings_record(s),
  }
  summary["findings"] = findings(by_name, seed)
  pngs = _plots(out, runs)
  overrides = " with " + ", ".join(f"`{k}={v}`" for k, v in s.model) if s.model else ""
  setup = (
      f"Model: T5 v1.1 tiny (`{GIN_FILES[0]}`){overrides}; "
      f"span corruption at {s.inputs_length}/{s.targets_length} tokens, batch {s.batch_size}, {steps} steps per run, "
      f"Adafactor with the learning rate `{s.learning_rate_factors}` (base {s.base_learning_rate:g}, "
      f"{s.warmup_steps} warm-up steps), seed {seed}. Data: the default "
      f"local corpus (Wikipedia articles from the gensim wheel, 8K-piece vocabulary); validation on "
      f"{s.eval_steps * s.eval_batch_size} examples of its held-out articles, the same for every run. "
      f"Wall time of this invocation: {wall_time_s:.0f} s.")
  rows = [{k: r[k] for k in _COLUMNS} for r in runs]
  cmds = "\n".join(f"# {name}\nrepeat-lm train " + " ".join(f"--gin_file={f}" for f in GIN_FILES) + " \\\n  " +
                   " \\\n  ".join(f"--gin.{_shell(b)}" for b in bindings) for name, bindings in commands.items())
  report.write_report(out, "Repeated vs fresh data (repeat-lm demo)", [
      ("What the runs show", "\n".join(f"- {t}" for t in summary["findings"]), [], rows),
      ("Setup", setup),
      ("Curves", "Validation loss and accuracy against tokens seen (every run reads the same budget); "
       "training loss for comparison.", pngs),
      ("Repeating a run", "Each run is `repeat-lm train` with these settings:\n\n```\n" + cmds + "\n```"),
  ])
  (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
  return summary


def _shell(binding: str) -> str:
  key, _, value = binding.partition(" = ")
  return f'{key}="{value}"'


def _settings_record(s: Settings) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(s)))


# ---- entry point ----

def run_demo(out: str | Path, *, seed: int = 0, quick: bool = False, steps: int | None = None,
             settings: Settings | None = None) -> dict:
  """Train the three runs (reusing finished ones) and write the report; returns summary.json's content.

  `settings` replaces the defaults (FULL, or QUICK with `quick`), e.g. to try another model or budget.
  """
  start = time.perf_counter()
  out = Path(out)
  s = settings or (QUICK if quick else FULL)
  if steps is not None:
    if steps < 1:  # 0 would read as "the whole budget" below
      raise ValueError(f"--steps={steps}: give at least 1 step, or leave it out to train the whole token budget.")
    s = dataclasses.replace(s, steps=steps)
  specs = run_specs(s)
  budget = budget_steps(s, specs)
  if s.steps is not None and s.steps > budget:  # the fresh run's task holds the budget once: no batch beyond it
    raise ValueError(f"--steps={s.steps}: the runs read a budget of 2^{s.budget_log2} tokens, {budget} full batches "
                     f"of {s.batch_size}; give at most {budget} steps.")
  total = s.steps or budget
  root = out / "runs" / f"{'quick' if quick else 'full'}_seed{seed}"
  dirs = [root / run.name for run in specs]
  records = [{"settings": _settings_record(s), "steps": total, "seed": seed, "task": task_name(s, run)}
             for run in specs]
  for model_dir, record in zip(dirs, records):
    _check_settings(model_dir, record)  # before training anything
  states = [_run_state(d, total) for d in dirs]
  summaries = []
  with compilation_cache(out / "jax_cache"):
    for i, (run, model_dir, record, state) in enumerate(zip(specs, dirs, records, states)):
      tag = f"run {i + 1}/{len(specs)}"
      if state == "done":
        _say(f"{tag} ({run.name}): finished before, reusing {model_dir}")
      else:
        _say(f"{tag} ({run.label}): {'resuming' if state == 'partial' else 'training'} {total} steps into {model_dir}")
        later = sum(st != "done" for st in states[i + 1:])
        progress = _Progress(i + 1, len(specs), run.name, model_dir, total, later, start)
        progress.start()
        try:
          _train_and_record(s, run, model_dir, record, total, seed)
        finally:
          progress.stop()
        if _run_state(model_dir, total) != "done":  # the trainer stops early on SIGTERM, after a checkpoint
          raise RuntimeError(f"{run.name} stopped before step {total}; run the same command again to resume it.")
      summaries.append({**summarise_run(run, model_dir, s), "reused": state == "done",
                        "train_wall_s": json.loads((model_dir / "demo_run.json").read_text())["train_wall_s"]})
  commands = {run.name: gin_bindings(s, run, d, total, seed) for run, d in zip(specs, dirs)}
  result = write_outputs(out, s, seed, total, summaries, time.perf_counter() - start, commands)
  for line in result["findings"]:
    _say(line)
  _say(f"report: {out / 'report.html'} ({result['wall_time_s']:.0f} s)")
  return result
