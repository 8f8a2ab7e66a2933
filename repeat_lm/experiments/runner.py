"""`repeat-lm sweep`: expand an experiment gin into named runs under ROOT, write each run's gin, run what is left.

Every run lives in ROOT/RUN: run.gin (self-contained), status.json, train.log, and the trainer's MODEL_DIR contents
(MODEL_DIR = ROOT/RUN). Launchers:
  local   one run after another, each `repeat-lm train` in its own subprocess (a crash fails that run, not the
          sweep), with run i/n, the step and an ETA on stderr;
  tpu-vm  `launch/tpu_vm.sh` per run (every worker of a TPU VM pod runs the same `repeat-lm train`); printed, or run
          one after another with --submit, with the same bookkeeping as local;
  slurm   `sbatch launch/slurm.sbatch ROOT/RUN` per run (the batch script records its own status); printed, or
          submitted with --submit (fine-tuning stages chained with --dependency=afterok).
Idempotent: finished runs are skipped, interrupted ones resume from their checkpoints (the trainer does that when
MODEL_DIR has checkpoints), failed ones are recorded with their error and retried by the next sweep.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from repeat_lm import files, gin_utils, runtime
from repeat_lm.experiments import collect, compose, status as status_lib, sweep

LAUNCHERS = ("local", "tpu-vm", "slurm")
LAUNCH_DIR = gin_utils.REPO_ROOT / "launch"
_COMPOSE_ERROR = "could not compose its gin"
# The error of a run whose training went non-finite (trainer.TrainingDivergedError, as `error_text` reads it): resuming
# is exact, so a retry restores the last good checkpoint and diverges again at the same step.
_DIVERGED_ERROR = "TrainingDivergedError"


@dataclasses.dataclass
class Options:
  launcher: str = "local"
  dry_run: bool = False
  only: str | None = None
  submit: bool = False  # remote launchers: run/submit the commands instead of printing them
  tpu: str | None = None
  zone: str | None = None
  project: str | None = None
  sbatch_args: Sequence[str] = ()
  bindings: Sequence[str] = ()  # applied to every run after the experiment's (e.g. a shorter TRAIN_STEPS)
  stream: TextIO = dataclasses.field(default_factory=lambda: sys.stderr)


@dataclasses.dataclass
class Stage:
  """A command to run in `run_dir`: a pre-training run, or a fine-tuning stage of one (`parent`)."""
  name: str
  run_dir: Path
  verb: str  # 'train' or 'finetune'
  spec: sweep.RunSpec
  parent: Stage | None = None
  waiting: list[str] = dataclasses.field(default_factory=list)  # unresolved sweep.Best values

  @property
  def gin(self) -> Path:
    return self.run_dir / status_lib.GIN_FILE


def _fmt_time(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
      f"{seconds // 60}:{seconds % 60:02d}"


# ---- preparing: names, gins, status ----

def _resolve_best(best: sweep.Best, root: Path, names: Sequence[str]) -> tuple[bool, Any]:
  """(resolved, value) of a sweep.Best from the finished runs it names."""
  matched = sweep.select([sweep.RunSpec(n, None, ()) for n in names], best.runs)
  rows = [collect.outcome(root / r.name) for r in matched]
  if not rows or any(r["status"] not in (status_lib.FINISHED, status_lib.FAILED) for r in rows):
    return False, best.default
  scored = [r for r in rows if r["status"] == status_lib.FINISHED and r.get(best.metric) is not None and
            math.isfinite(float(r[best.metric]))]
  if not scored:
    finished = [r for r in rows if r["status"] == status_lib.FINISHED]
    if finished and not any(best.metric in r for r in finished):  # a misspelt metric would wait forever
      raise ValueError(f"sweep.Best(runs={best.runs!r}, metric={best.metric!r}): no finished run of those has a "
                       f"metric {best.metric!r}; choose one of {sorted(set().union(*finished))}.")
    return False, best.default
  pick = (max if best.mode == "max" else min)(scored, key=lambda r: float(r[best.metric]))
  if best.column not in pick:  # a misspelt column would hand the dependent run None
    raise ValueError(f"sweep.Best(runs={best.runs!r}, column={best.column!r}): the best of those runs has no "
                     f"column {best.column!r}; choose one of {sorted(pick)}.")
  return True, pick[best.column]


def _all_failed(best: sweep.Best, root: Path, names: Sequence[str]) -> str:
  """Why a Best waits when every run it names has failed (its value comes from finished runs only), else ''. The
  waiting line named only the runs and the metric: with them all diverged, which no sweep retries unchanged, the run
  waited on every sweep without a word of why."""
  runs = [root / r.name for r in sweep.select([sweep.RunSpec(n, None, ()) for n in names], best.runs)]
  records = [status_lib.read(d) for d in runs]
  if not runs or any(collect.shown_status(d, rec) != status_lib.FAILED for d, rec in zip(runs, records)):
    return ""
  diverged = sum(_diverged(rec) for rec in records)
  return (f" (all {len(runs)} of those runs failed{f', {diverged} diverged' if diverged else ''}: the next sweep "
          "retries them, a diverged one only once its settings change)")


def same_experiment(recorded: str, given: str) -> bool:
  """Whether a run's recorded experiment path is the one given now, however either is spelt: './gin/x.gin', an
  absolute path and 'gin/x.gin' warned 'two experiments share this ROOT' for every run. A recorded path that does not
  resolve from here (another working directory) is compared by its file name."""
  if os.path.normpath(recorded) == os.path.normpath(given):
    return True
  if os.path.exists(recorded) and os.path.exists(given):
    return os.path.samefile(recorded, given)
  return os.path.basename(recorded) == os.path.basename(given)


def warn_of_other_experiments(exp: compose.Experiment, root: Path) -> None:
  """ROOT's runs recorded by another experiment: collect would put both experiments' runs in one table, which
  analyze reads as one experiment (a sweep of rq5 into rq3's ROOT said nothing)."""
  if not root.is_dir():
    return
  others = collections.Counter(
      record["experiment"] for record in (status_lib.read(d) for d in collect.run_dirs(root))
      if record.get("experiment") and not same_experiment(record["experiment"], exp.path))
  for other, count in sorted(others.items()):
    logging.warning("%s already holds %d run(s) of another experiment, %s: `collect` puts both experiments' runs in "
                    "one table. Give each experiment a ROOT of its own.", root, count, other)


def write_run(exp: compose.Experiment, stage: Stage, root: Path, index: int, varied: Sequence[str]) -> None:
  """Compose and write the stage's gin and its status entry (a finished stage keeps the gin it ran with)."""
  record = status_lib.read(stage.run_dir)
  if record.get("experiment") is not None and not same_experiment(record["experiment"], exp.path):
    logging.warning("%s belongs to %s, not %s: two experiments share this ROOT and a run name.", stage.run_dir,
                    record["experiment"], exp.path)
  finished = record.get("status") == status_lib.FINISHED
  if stage.verb == "finetune":
    ft = next(f for f in stage.spec.finetune if f"ft_{f.name}" == stage.name.rsplit("/", 1)[-1])
    text = compose.finetune_gin(exp, stage.spec, ft, stage.parent.gin.read_text(), str(stage.run_dir))
    values: dict[str, Any] = {}
  else:
    names = [r.name for r in exp.runs]
    resolved, stage.waiting = {}, []
    for key, best in stage.spec.best.items():
      ok, value = _resolve_best(best, root, names)
      if ok:
        resolved[key] = value
      else:
        stage.waiting.append(f"{key}: best of {best.runs} by {best.metric}{_all_failed(best, root, names)}")
    text, values = compose.run_gin(exp, stage.spec, str(stage.run_dir), varied, resolved)
  stage.run_dir.mkdir(parents=True, exist_ok=True)
  if finished and stage.gin.exists():
    if _body(stage.gin.read_text()) != _body(text):
      logging.warning("%s is finished but its configuration changed since; it is not re-run (delete %s to re-run "
                      "it; it would resume from its checkpoint).", stage.name, stage.run_dir / status_lib.STATUS_FILE)
    return
  changed = stage.gin.exists() and _body(stage.gin.read_text()) != _body(text)
  update: dict[str, Any] = {"run": stage.name, "experiment": exp.path, "index": index}
  if str(record.get("error") or "").startswith(_COMPOSE_ERROR):  # fixed since: runnable again
    update.update(status=status_lib.PENDING, error=None)
  if changed and _diverged(record):  # new settings (a lower rate, more dropout) may train: retried
    update.update(status=status_lib.PENDING, error=None)
  if stage.verb == "train":
    update.update(values=values, finetune=[f.name for f in stage.spec.finetune])
  who = status_lib.write_gin(stage.run_dir, text, **update)
  if who is not None:
    if changed:
      logging.warning("%s is being trained by %s; its configuration changed since that attempt started. Its run.gin "
                      "is left as that attempt read it: the change applies after that attempt (to a later sweep's, "
                      "unless it finishes the run).", stage.name, who)
  elif changed and files.checkpoint_steps(stage.run_dir):
    logging.warning("%s: its configuration changed since it started; resuming from its checkpoint may fail. Delete "
                    "%s to start it afresh.", stage.name, stage.run_dir)


def _diverged(record: dict[str, Any]) -> bool:
  # The exception's name, bare ('repeat-lm: error: TrainingDivergedError: ...') or qualified, as a traceback's last
  # line gives it under --log_level=DEBUG ('repeat_lm.train.trainer.TrainingDivergedError: ...').
  name = str(record.get("error") or "").split(":", 1)[0].strip()
  return record.get("status") == status_lib.FAILED and name.rsplit(".", 1)[-1] == _DIVERGED_ERROR


def _body(gin_text: str) -> str:
  """A run gin without its comment header: what the run computes."""
  return "\n".join(line for line in gin_text.splitlines() if not line.startswith("#"))


def plan(exp: compose.Experiment, root: Path, only: str | None) -> list[Stage]:
  """Stages (runs, each followed by its fine-tuning stages) of the selected runs, their gins written."""
  varied = compose.varied_keys(exp.runs)
  stages = []
  for spec in exp.runs:
    if spec not in sweep.select([spec], only):
      continue
    run = Stage(spec.name, root / spec.name, "train", spec)
    stages.append(run)
    stages += [Stage(f"{spec.name}/ft_{f.name}", run.run_dir / f"ft_{f.name}", "finetune", spec, parent=run)
               for f in spec.finetune]
  for stage in stages:
    try:
      write_run(exp, stage, root, exp.runs.index(stage.spec), varied)
      # After write_run: a changed TRAIN_STEPS (run.gin rewritten) decides whether the run's checkpoint is its last.
      status_lib.settle(stage.run_dir)
    except (gin_utils.GinConfigError, FileNotFoundError) as e:  # one bad arm must not hide the others
      if status_lib.read(stage.run_dir).get("status") == status_lib.FINISHED:  # its results stand as they are
        logging.warning("%s is finished; its configuration no longer composes (%s), it is left as it is.",
                        stage.name, e)
        continue
      if (who := status_lib.running(stage.run_dir)) is not None:  # its record is that attempt's until it ends
        logging.warning("%s is being trained by %s; its configuration no longer composes (%s): that attempt goes on "
                        "with the run.gin it read.", stage.name, who, e)
        continue
      status_lib.write(stage.run_dir, run=stage.name, experiment=exp.path, status=status_lib.FAILED,
                       error=f"{_COMPOSE_ERROR}: {e}")
  return stages


# ---- commands ----

def _local_command(stage: Stage) -> list[str]:
  return runtime.cli_command(stage.verb, f"--gin_file={stage.gin}")


# Printed in place of a --tpu / --zone not given, for the shell to fill in from its environment.
_PLACEHOLDERS = ("$TPU_NAME", "$ZONE")
# Printed in place of the job id of a run not yet submitted (`${JOB_d27_e8:?...}`, see _printed_dependency).
_JOB_PLACEHOLDER = re.compile(r"\$\{JOB_\w+:\?[\w .-]*\}$")


def _job_name(stage: Stage) -> str:
  return stage.name.replace("/", ".")


def display_command(stage: Stage, opts: Options, after: str | None = None) -> list[str]:
  """The command a launcher runs (or prints) for a stage; slurm: `after` is the job it waits for (afterok)."""
  if opts.launcher == "tpu-vm":
    flags = [f"--tpu={opts.tpu or _PLACEHOLDERS[0]}", f"--zone={opts.zone or _PLACEHOLDERS[1]}"]
    flags += [f"--project={opts.project}"] if opts.project else []
    return [str(LAUNCH_DIR / "tpu_vm.sh"), *flags, stage.verb, f"--gin_file={stage.gin.resolve()}"]
  if opts.launcher == "slurm":
    # The batch script runs from SLURM's spool directory and defaults REPO_DIR to the submit directory (wherever the
    # sweep was started): the repository whose launch/ it is, passed explicitly, is the one whose .venv the job runs.
    return ["sbatch", *([f"--dependency=afterok:{after}"] if after else []), f"--job-name={_job_name(stage)}",
            f"--output={stage.run_dir.resolve()}/slurm-%j.log", f"--export=ALL,REPO_DIR={LAUNCH_DIR.parent}",
            *opts.sbatch_args, str(LAUNCH_DIR / "slurm.sbatch"), str(stage.run_dir.resolve()), stage.verb]
  return ["repeat-lm", stage.verb, f"--gin_file={stage.gin}"]


def _printed_dependency(stage: Stage) -> str | None:
  """The job a printed fine-tuning line waits for, as --submit would chain it: none once its run is finished, the
  run's job while it is submitted, else a variable for the job id that sbatch has yet to give its run. Unset, the
  shell refuses the line (`${VAR:?}`) rather than start fine-tuning alongside pre-training."""
  if stage.parent is None:
    return None
  record = status_lib.read(stage.parent.run_dir)
  state = status_lib.effective(record)
  if state == status_lib.FINISHED:
    return None
  if state == status_lib.RUNNING and record.get("job_id"):
    return str(record["job_id"])
  var = "JOB_" + re.sub(r"[^A-Za-z0-9_]", "_", stage.parent.name)
  return f"${{{var}:?set {var} to the job id of {_job_name(stage.parent)}}}"


def shell_line(command: Sequence[str]) -> str:
  """A command as a line to paste into a shell: quoted like shlex.join, except that a placeholder stays a variable
  (`--tpu="$TPU_NAME"`; shlex.join's '--tpu=$TPU_NAME' would hand gcloud the TPU name '$TPU_NAME')."""
  parts = []
  for arg in command:
    var = next((v for v in _PLACEHOLDERS if arg.endswith("=" + v)), None)
    job = _JOB_PLACEHOLDER.search(arg) if arg.startswith("--dependency=") else None
    var = var or (job.group() if job else None)
    parts.append(f'{shlex.quote(arg[:-len(var)])}"{var}"' if var else shlex.quote(arg))
  return " ".join(parts)


# ---- running ----

class _Progress:
  """Run i/n, the current run's step and an ETA, on one line of a terminal or a line every 30 s in a log."""

  def __init__(self, stream: TextIO, total: int):
    self.stream, self.total = stream, total
    self.tty = hasattr(stream, "isatty") and stream.isatty()
    self.durations: list[float] = []
    self._last_print = 0.0

  def eta(self, remaining_after: int, current_left: float | None, current_elapsed: float) -> float | None:
    """Seconds until the sweep ends: the current run's rest, plus the mean run so far (or this run's projected
    length, before any run has ended) for each run after it."""
    projected = current_elapsed + current_left if current_left is not None else None
    mean = sum(self.durations) / len(self.durations) if self.durations else projected
    if mean is None:
      return None
    if current_left is None:  # no step rate yet: this run counts as a mean run
      current_left = max(mean - current_elapsed, 0.0)
    return current_left + remaining_after * mean

  def line(self, text: str, final: bool = False) -> None:
    if self.tty:
      self.stream.write("\r\033[K" + text + ("\n" if final else ""))
      self.stream.flush()
    elif final or time.time() - self._last_print >= 30:
      self.stream.write(text + "\n")
      self.stream.flush()
      self._last_print = time.time()


def _last_step(run_dir: Path) -> int | None:
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return None
  with path.open("rb") as f:
    f.seek(max(0, path.stat().st_size - 4096))
    lines = f.read().decode(errors="replace").splitlines()
  for line in reversed(lines):
    if '"step"' in line:
      try:
        return int(json.loads(line)["step"])
      except (ValueError, KeyError):
        continue
  return None


def _run_blocking(stage: Stage, command: list[str], progress: _Progress, i: int, n: int, left: int) -> int:
  """Run one stage's command to its end, its output in the stage's train.log; returns the exit code."""
  total = status_lib.train_steps(stage.gin.read_text()) or 0
  log_path = stage.run_dir / status_lib.LOG_FILE
  start = time.time()
  first = (None, None)  # (time, step) of the first step seen in this attempt, for the step rate
  with log_path.open("a") as log:
    log.write(f"\n{status_lib.ATTEMPT_HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=runtime.child_env())
    status_lib.trainer_started(stage.run_dir, proc.pid)
    try:
      while True:
        try:
          return proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
          pass
        step = _last_step(stage.run_dir)
        if step is not None and first[0] is None:
          first = (time.time(), step)
        current_left = None
        if step is not None and first[0] is not None and step > first[1]:
          rate = (time.time() - first[0]) / (step - first[1])
          current_left = rate * (total - step)
        eta = progress.eta(left, current_left, time.time() - start)
        progress.line(f"[{i}/{n}] {stage.name}: step {step if step is not None else '-'}/{total}, "
                      f"{_fmt_time(time.time() - start)} elapsed, sweep ETA {_fmt_time(eta)}")
    except KeyboardInterrupt:
      # SIGTERM makes the trainer save a checkpoint at the next step and exit cleanly: the next sweep resumes.
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=120)
      except (subprocess.TimeoutExpired, KeyboardInterrupt):
        # No exit in time, or a second Ctrl-C / SIGTERM: killed now, and waited for. The sweep lets go of the run's
        # lock next; a trainer left running would let another sweep start a second one on the same MODEL_DIR.
        proc.kill()
        proc.wait()
      raise


def _claimable(stage: Stage) -> str | None:
  """Why a stage is not to be run now (None: run it)."""
  record = status_lib.read(stage.run_dir)
  state = status_lib.effective(record)
  if state == status_lib.FINISHED:
    return "finished"
  if state == status_lib.RUNNING and record.get("job_id"):
    return f"submitted to SLURM (job {record['job_id']})"
  if stage.parent is not None and status_lib.read(stage.parent.run_dir).get("status") != status_lib.FINISHED:
    return f"waiting for {stage.parent.name} to finish"
  if stage.waiting:
    return "waiting for " + "; ".join(stage.waiting)
  if str(record.get("error") or "").startswith(_COMPOSE_ERROR):
    return "failed: " + record["error"]
  if _diverged(record):
    return (f"diverged, not retried (resuming would diverge again at the same step): change its settings, or delete "
            f"{stage.run_dir} to train it afresh")
  return None


def _interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def run_blocking(exp: compose.Experiment, root: Path, stages: list[Stage], opts: Options) -> None:
  """Local and tpu-vm --submit: one stage after another, each in a subprocess. SIGTERM to the sweep acts as Ctrl-C:
  the current trainer is told to checkpoint and stop, so no trainer outlives its sweep (its own session keeps it
  from the terminal's Ctrl-C, which the sweep forwards as SIGTERM)."""
  main = threading.current_thread() is threading.main_thread()
  # SIGHUP too (a closed terminal, a lost ssh session): the trainer runs in its own session and never gets it.
  signums = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
  previous = {s: signal.signal(s, _interrupt) for s in signums} if main else {}
  try:
    _run_stages(exp, root, stages, opts)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _run_stages(exp: compose.Experiment, root: Path, stages: list[Stage], opts: Options) -> None:
  runs = [s for s in stages if s.verb == "train"]
  progress = _Progress(opts.stream, len(runs))
  varied = compose.varied_keys(exp.runs)
  for i, stage in enumerate(stages):
    n_run = runs.index(stage) + 1 if stage in runs else runs.index(stage.parent) + 1
    label = f"[{n_run}/{len(runs)}] {stage.name}"
    if stage.waiting:  # sweep.Best values may have become known from runs finished earlier in this sweep
      write_run(exp, stage, root, exp.runs.index(stage.spec), varied)
    reason = _claimable(stage)
    if reason:
      progress.line(f"{label}: {reason}, skipped", final=True)
      continue
    if not status_lib.acquire(stage.run_dir):
      progress.line(f"{label}: {status_lib.running(stage.run_dir) or 'another sweep'} is running it, skipped",
                    final=True)
      continue
    # Read again under the lock: another sweep may have finished the run (and let go of its lock) since.
    reason = _claimable(stage)
    if reason:
      status_lib.release(stage.run_dir)
      progress.line(f"{label}: {reason}, skipped", final=True)
      continue
    left = sum(1 for s in stages[i + 1:] if _claimable(s) is None or s.parent is stage)
    command = _local_command(stage) if opts.launcher == "local" else display_command(stage, opts)
    try:
      status_lib.started(stage.run_dir, command=shell_line(display_command(stage, opts)))
      start = time.time()
      try:
        code = _run_blocking(stage, command, progress, n_run, len(runs), left)
      except KeyboardInterrupt:
        if status_lib.exited(stage.run_dir, 0)["status"] != status_lib.FINISHED:
          status_lib.write(stage.run_dir, status=status_lib.PENDING,
                           error="interrupted; the next sweep resumes it from its checkpoint")
        progress.line(f"{label}: interrupted, its trainer saved a checkpoint", final=True)
        raise
      record = status_lib.exited(stage.run_dir, code)
      progress.durations.append(time.time() - start)
    finally:
      status_lib.release(stage.run_dir)
    detail = f" ({brief})" if (brief := error_summary(record.get("error"), 200)) else ""
    progress.line(f"{label}: {record['status']} in {_fmt_time(time.time() - start)}{detail}", final=True)


# A full stop before a space, not the one of an abbreviation the project's messages use.
_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)\. ")


def error_summary(error: str | None, limit: int) -> str:
  """The first line of a run's error within `limit` characters, cut after its last sentence there (one ending in the
  second half; "e.g." is no end) or else after a word, and pointing at the whole message: a plain cut ended the
  RQ2 CPU corpus error at "... or use corpus='wiki' for the."."""
  line = next(iter((error or "").strip().splitlines()), "")
  if len(line) <= limit:
    return line
  window = line[:limit + 1]  # a sentence may end at the limit itself
  ends = [m.start() + 1 for m in _SENTENCE_END.finditer(window) if m.start() + 1 <= limit]
  word = line[:limit].rfind(" ")
  cut = ends[-1] if ends and ends[-1] >= limit // 2 else word if word > 0 else limit
  return f"{line[:cut].rstrip()} ... (the whole message: RUN/{status_lib.STATUS_FILE})"


def submit_slurm(stages: list[Stage], opts: Options) -> None:
  jobs: dict[str, str] = {}
  for stage in stages:
    reason = _claimable(stage)
    record = status_lib.read(stage.run_dir)
    if stage.parent is not None and stage.parent.name in jobs:
      reason = None  # chained on the parent's job below
    elif reason or status_lib.effective(record) == status_lib.RUNNING:
      opts.stream.write(f"{stage.name}: {reason or 'running (job ' + str(record.get('job_id')) + ')'}, skipped\n")
      continue
    command = display_command(stage, opts, after=jobs.get(stage.parent.name) if stage.parent else None)
    try:
      out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # recorded like a failed run; the others still go
      error = (getattr(e, "stderr", None) or str(e)).strip()
      status_lib.write(stage.run_dir, status=status_lib.FAILED, error=f"sbatch failed: {error}")
      opts.stream.write(f"{stage.name}: sbatch failed: {error}\n")
      continue
    job = out.strip().split()[-1] if out.strip() else "?"  # "Submitted batch job 123"
    jobs[stage.name] = job
    status_lib.submitted(stage.run_dir, job, command=shlex.join(command))
    opts.stream.write(f"{stage.name}: submitted as job {job}\n")


def summary(exp: compose.Experiment, root: Path, stages: list[Stage], wall_s: float) -> dict[str, Any]:
  status_lib.prefetch_slurm(status_lib.read(s.run_dir) for s in stages)  # jobs submitted since: one squeue call
  counts: dict[str, int] = {}
  failed = {}
  for s in stages:
    record = status_lib.read(s.run_dir)
    state = status_lib.effective(record)
    counts[state] = counts.get(state, 0) + 1
    if state == status_lib.FAILED:
      failed[s.name] = error_summary(record.get("error"), 300)
  return {"experiment": exp.path, "root": str(root), "runs": sum(s.verb == "train" for s in stages),
          "stages": len(stages), "status": counts, "failed": failed, "wall_s": round(wall_s, 1)}


def run_sweep(experiment: str, root: str | Path, opts: Options | None = None) -> dict[str, Any]:
  """Expand, write and run (or print) the experiment's runs under `root`; returns a summary."""
  opts = opts or Options()
  if opts.launcher not in LAUNCHERS:
    raise ValueError(f"--launcher must be one of {LAUNCHERS}, got {opts.launcher!r}.")
  if opts.launcher == "tpu-vm" and opts.submit and not opts.dry_run and not (opts.tpu and opts.zone):
    raise ValueError("--launcher=tpu-vm --submit needs --tpu=NAME and --zone=ZONE.")
  script = {"tpu-vm": "tpu_vm.sh", "slurm": "slurm.sbatch"}.get(opts.launcher)
  if script and not (LAUNCH_DIR / script).is_file():  # a wheel install ships the gin files, not launch/
    raise FileNotFoundError(f"--launcher={opts.launcher} runs {LAUNCH_DIR / script}, which this install does not "
                            "have: the launch scripts come with a source checkout (git clone, then "
                            "pip install -e '.[gpu]' or '.[tpu]'); run the sweep from there.")
  if opts.launcher == "slurm" and "," in str(LAUNCH_DIR.parent):  # sbatch --export splits its list at commas
    raise ValueError(f"--launcher=slurm passes the repository to its jobs as --export=ALL,REPO_DIR=PATH, which "
                     f"cannot hold a comma: move the checkout {LAUNCH_DIR.parent} to a path without one.")
  start = time.time()
  root = Path(root).absolute()  # MODEL_DIR must not depend on the directory a run is started from
  exp = compose.load(experiment, opts.bindings)
  with status_lib.slurm_cache():  # one squeue call for all the runs' jobs, not one per run and per look at it
    return _run_sweep(exp, root, opts, start)


def _run_sweep(exp: compose.Experiment, root: Path, opts: Options, start: float) -> dict[str, Any]:
  sweep.check_only(exp.runs, opts.only)
  warn_of_other_experiments(exp, root)
  # The runs' jobs and their fine-tuning stages' in one squeue call, before plan asks whether each is running: asked
  # after it, every stage's job had cost a call of its own.
  status_lib.prefetch_slurm(status_lib.read(d) for r in sweep.select(exp.runs, opts.only)
                            for d in [root / r.name, *(root / r.name / f"ft_{f.name}" for f in r.finetune)])
  stages = plan(exp, root, opts.only)
  if not stages:
    raise ValueError(f"--only={opts.only!r} matches none of the {len(exp.runs)} runs: "
                     f"{[r.name for r in exp.runs]}.")
  runs = [s for s in stages if s.verb == "train"]
  done = sum(status_lib.read(s.run_dir).get("status") == status_lib.FINISHED for s in runs)
  opts.stream.write(f"sweep {exp.path}: {len(runs)} runs ({done} finished), {len(stages) - len(runs)} fine-tuning "
                    f"stages, in {root}\n")
  if opts.dry_run or (opts.launcher != "local" and not opts.submit):
    uncomposed = {}
    for s in stages:
      record = status_lib.read(s.run_dir)
      state = status_lib.effective(record)
      note = f"  # {state}" + (f"; waiting for {'; '.join(s.waiting)}" if s.waiting else "")
      if str(record.get("error") or "").startswith(_COMPOSE_ERROR):  # the line said 'failed', and not why
        uncomposed[s.name] = error_summary(record["error"], 300)
        note += f": {uncomposed[s.name]}"
      after = _printed_dependency(s) if opts.launcher == "slurm" else None
      opts.stream.write(f"{shell_line(display_command(s, opts, after))}{note}\n")
    result = summary(exp, root, stages, time.time() - start)
    result["run_names"] = [s.name for s in runs]
    result["uncomposed"] = uncomposed
    return result
  if opts.launcher == "slurm":
    submit_slurm(stages, opts)
  else:
    run_blocking(exp, root, stages, opts)
  return summary(exp, root, stages, time.time() - start)
