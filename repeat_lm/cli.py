"""`repeat-lm`: the only place that parses command-line arguments.

Each subcommand has an `_add_<name>` function that declares its arguments and a `_run_<name>` function that calls
into the library; `COMMANDS` lists them. Library code never sees argparse objects.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any


class CommandExit(Exception):
  """A command that failed with an exit status of its own to end with (launch-local: its failing process's)."""

  def __init__(self, code: int, message: str):
    super().__init__(message)
    self.code = code


def _columns(text: str) -> tuple[str, ...]:
  """COL[,COL]: column names of a results table."""
  names = tuple(c.strip() for c in text.split(","))
  if not all(names):
    raise argparse.ArgumentTypeError(f"{text!r} has an empty column name; give COL[,COL]")
  return names


def _seed(text: str) -> int:
  """A --seed: NumPy's generators refuse a negative one ("expected non-negative integer", naming no flag)."""
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"{value} is negative; give a seed >= 0")
  return value


def _add_gin_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--gin_file", action="append", default=[], help="Gin file (repeatable; later files win).")
  p.add_argument("--gin_search_path", action="append", default=[], help="Extra directory for gin includes.")


# ---- train / eval ----

def _add_train(sub) -> None:
  _add_gin_args(sub.add_parser("train", help="Train (or resume) the gin-configured model into MODEL_DIR.",
                               description="Gin bindings: --gin.KEY=VALUE (repeatable), as in T5X."))


def _add_eval(sub) -> None:
  _add_gin_args(sub.add_parser("eval", help="Evaluate a checkpoint of MODEL_DIR on the validation split.",
                               description="Gin bindings: --gin.KEY=VALUE (repeatable), as in T5X."))


def _add_finetune(sub) -> None:
  _add_gin_args(sub.add_parser(
      "finetune", help="Fine-tune from INITIAL_CHECKPOINT_PATH (repeat_lm, Hugging Face or T5X) into MODEL_DIR, "
      "evaluating by decoding (gin/runs/finetune.gin).", description="Gin bindings: --gin.KEY=VALUE, as in T5X."))


def _run_gin_command(args, bindings: Sequence[str]) -> dict:
  from repeat_lm import gin_utils
  from repeat_lm.train import distributed
  distributed.maybe_initialize()
  from repeat_lm.train import trainer
  gin_utils.parse(args.gin_file, bindings, args.gin_search_path)
  if args.command == "finetune":
    _require_initial_checkpoint()
  fn = trainer.evaluate if args.command == "eval" else trainer.train
  return gin_utils.call_configured(fn)


def _require_initial_checkpoint() -> None:
  import gin
  from repeat_lm import gin_utils
  try:
    path = gin.query_parameter("trainer.train.initial_checkpoint_path")
    if isinstance(path, gin.config.ConfigurableReference) and path.selector == "gin.macro":
      path = gin.query_parameter(f"%{path.scoped_selector.split('/')[0]}")
  except ValueError:
    path = None
  if repr(path) == "%gin.REQUIRED":
    return  # reported with the other missing settings when the configuration is called
  if not path:
    raise gin_utils.GinConfigError("finetune starts from a pre-trained model: bind INITIAL_CHECKPOINT_PATH (e.g. "
                                   "--gin_file=gin/runs/finetune.gin --gin.INITIAL_CHECKPOINT_PATH=\"'/path'\").")


# ---- infer / export ----

def _add_infer(sub) -> None:
  p = sub.add_parser("infer", help="Decode each line of a text file with a MODEL_DIR's model (greedy, sampling or "
                     "beam search); prints one JSON object with the outputs unless --output_file is given.",
                     description="The model and its vocabulary come from MODEL_DIR/config.gin unless --gin_file.")
  _add_gin_args(p)
  p.add_argument("--checkpoint", required=True, help="MODEL_DIR of a repeat_lm run (its latest checkpoint).")
  p.add_argument("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
  p.add_argument("--input_file", required=True, help="UTF-8 text, one input per line.")
  p.add_argument("--output_file", default=None, help="Write one output per line here.")
  p.add_argument("--method", choices=["greedy", "sample", "beam"], default="greedy")
  p.add_argument("--max_decode_length", type=int, default=64)
  p.add_argument("--num_beams", type=int, default=4)
  p.add_argument("--length_penalty_alpha", type=float, default=0.6)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--topk", type=int, default=0, help="Sampling: keep the k most likely tokens (0: all).")
  p.add_argument("--seed", type=_seed, default=0)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--max_input_length", type=int, default=None,
                 help="Cut inputs to this many tokens, EOS included (default: the run's TASK_FEATURE_LENGTHS "
                 "inputs, else 512), as T5X's infer trims them; a warning counts the inputs cut.")
  p.add_argument("--vocabulary", default=None, help="SentencePiece model, if the gin names no task.")


def _run_infer(args, bindings: Sequence[str]) -> dict:
  from repeat_lm.models import decoding
  from repeat_lm.train import inference
  cfg = decoding.DecodeConfig(method=args.method, max_decode_length=args.max_decode_length,
                              num_beams=args.num_beams, length_penalty_alpha=args.length_penalty_alpha,
                              temperature=args.temperature, topk=args.topk, seed=args.seed)
  outputs = inference.infer(args.checkpoint, args.input_file, output_file=args.output_file, decode=cfg,
                            step=args.step, gin_files=args.gin_file, bindings=bindings,
                            sentencepiece_model=args.vocabulary, batch_size=args.batch_size,
                            gin_search_paths=args.gin_search_path, max_input_length=args.max_input_length)
  return {"outputs": len(outputs), "output_file": args.output_file} if args.output_file else {"outputs": outputs}


def _add_export(sub) -> None:
  p = sub.add_parser("export", help="Export a checkpoint to another framework: `export hf` writes a Hugging Face "
                     "directory.")
  export_sub = p.add_subparsers(dest="export_format", required=True)
  h = export_sub.add_parser("hf", help="A from_pretrained directory: config, safetensors weights, tokenizer (T5 as "
                            "T5ForConditionalGeneration, MoE as SwitchTransformersForConditionalGeneration).",
                            description="The model comes from MODEL_DIR/config.gin unless --gin_file is given.")
  _add_gin_args(h)
  h.add_argument("--checkpoint", required=True, help="MODEL_DIR of a repeat_lm run.")
  h.add_argument("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
  h.add_argument("--out", required=True, help="Output directory.")
  h.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  h.add_argument("--overwrite", action="store_true", help="Replace model files in --out that no earlier repeat_lm "
                 "export wrote (an earlier export, marked by its repeat_lm_export.json, is replaced without it).")
  h.add_argument("--vocabulary", default=None,
                 help="SentencePiece model for the tokenizer (default: the vocabulary of the gin's task).")


def _run_export(args, bindings: Sequence[str]) -> dict:
  from repeat_lm.interop import hf
  from repeat_lm.train import inference
  model, task = inference.model_from_model_dir(args.checkpoint, args.gin_file, bindings, args.gin_search_path)
  vocabulary = inference.vocabulary_of(task, args.vocabulary)
  if args.vocabulary:  # a task's vocabulary was checked against the model when it trained
    inference.check_vocabulary_fits(vocabulary, model.module.config.vocab_size)
  params = inference.restore_params(args.checkpoint, model.module, args.step)
  spm = getattr(vocabulary, "sentencepiece_model_file", None) if vocabulary is not None else None
  out = hf.export_hf(params, model.module.config, args.out, sentencepiece_model=spm,
                     extra_ids=getattr(vocabulary, "extra_ids", 100) or 0, dtype=args.dtype, overwrite=args.overwrite)
  if spm is None:
    logging.warning("No vocabulary known (no MIXTURE_OR_TASK_NAME in the gin): exported without a tokenizer; pass "
                    "--vocabulary=PATH to add one.")
  return {"out": str(out), "tokenizer": spm is not None}


# ---- bench ----

def _add_bench(sub) -> None:
  p = sub.add_parser("bench", help="Benchmarks: `bench train` times the compiled training step, "
                     "`bench moe` an MoE step against its dense twin, `bench data` the input pipeline; "
                     "`bench report` / `bench accelerator` rewrite docs/performance*.md.")
  bench_sub = p.add_subparsers(dest="bench_command", required=True)
  t = bench_sub.add_parser("train", help="Time the training step of a model gin; optionally against Hugging Face.",
                           description="Gin bindings: --gin.KEY=VALUE apply to the model gin.")
  _add_gin_args(t)
  t.add_argument("--batch_size", type=int, default=8)
  t.add_argument("--inputs_length", type=int, default=512)
  t.add_argument("--targets_length", type=int, default=114)
  t.add_argument("--steps", type=int, default=5, help="Steps per timed round.")
  t.add_argument("--rounds", type=int, default=5, help="Timed rounds (the median gives the step time).")
  t.add_argument("--data_parallel", type=int, default=-1)
  t.add_argument("--model_parallel", type=int, default=1)
  t.add_argument("--dtype", default="auto",
                 help="Activation dtype: 'auto' keeps the gin's on accelerators and uses float32 on CPU. With "
                      "bfloat16 the CPU peak is a bfloat16 probe and --compare=hf runs the peer under torch.autocast.")
  t.add_argument("--compare", choices=["hf"], default=None, help="Also time Hugging Face's PyTorch T5, interleaved.")
  t.add_argument("--json", action="store_true", help="Print one JSON object only.")
  t.add_argument("--profile_dir", default=None,
                 help="After timing, trace one more round into this directory and write ops.md: time per HLO op.")
  t.add_argument("--compile_only", action="store_true",
                 help="Only lower + compile the step from abstract shapes (no allocation); report compile time.")
  _add_bench_moe(bench_sub)
  _add_bench_data(bench_sub)
  r = bench_sub.add_parser("report", help="Measure the zoo and rewrite docs/performance.md.")
  r.add_argument("--out", default="docs/performance.md")
  r.add_argument("--no_hf", action="store_true", help="Skip the Hugging Face comparison.")
  a = bench_sub.add_parser(
      "accelerator", help="On a GPU/TPU: T5 v1.1 Base step variants (scan, remat policy, cuDNN attention, batch), "
      "one process each; write docs/performance_accelerator.md and .json.")
  a.add_argument("--out", default="docs/performance_accelerator.md")
  a.add_argument("--batch_size", type=int, default=128, help="T5's pre-training batch; the fastest variant is "
                 "also run at twice this.")
  a.add_argument("--steps", type=int, default=10, help="Steps per timed round.")
  a.add_argument("--rounds", type=int, default=3, help="Timed rounds (the median gives the step time).")
  a.add_argument("--time_budget_s", type=float, default=480.0,
                 help="Start no variant after this many seconds; what was measured by then is written.")
  a.add_argument("--variant_timeout_s", type=float, default=300.0,
                 help="A variant's process is stopped after this (an unrolled T5-Base one took 174-180 s on an H200).")
  a.add_argument("--variant", action="append", default=[],
                 help="Repeatable 'scan|unrolled:REMAT:einsum|xla|cudnn[-mask]:BATCH' (e.g. unrolled:none:cudnn:128; "
                 "'-mask': padding as a boolean mask, not lengths): run these instead of the default sweep.")
  a.add_argument("--previous", default=None, help="JSON of an earlier run on the same device: its rows are kept.")
  a.add_argument("--gin_file", default=None, help="Model gin (default T5 v1.1 Base).")
  a.add_argument("--from_json", default=None, help="Only re-render OUT from this JSON of an earlier run.")
  a.add_argument("--profile_xplane", default=None,
                 help="Add a table of device time per kernel kind from this trace (launch/accelerator_checks.sh "
                 "PROFILE=1 writes OUT_DIR/step.xplane.pb).")
  a.add_argument("--profile_steps", type=int, default=3, help="Steps in the --profile_xplane trace.")
  a.add_argument("--profile_variant", default="unrolled, remat none, cudnn attention, batch 128",
                 help="The variant the --profile_xplane trace ran.")


def _add_bench_moe(bench_sub) -> None:
  m = bench_sub.add_parser(
      "moe", help="Time an MoE model's training step against its dense twin, per dispatch method and group size.",
      description="Gin bindings: --gin.KEY=VALUE apply to the (MoE) model gin; the dense twin is the same model with "
      "every FFN dense, FLOP-matched only where the experts have the dense FFN's shape and top-1 routing (Switch); "
      "each row gives its model FLOPs against the twin's.")
  _add_gin_args(m)
  m.add_argument("--batch_size", type=int, default=8)
  m.add_argument("--inputs_length", type=int, default=512)
  m.add_argument("--targets_length", type=int, default=114)
  m.add_argument("--steps", type=int, default=3, help="Steps per timed round.")
  m.add_argument("--rounds", type=int, default=5, help="Timed rounds, interleaved across variants (median).")
  m.add_argument("--dispatch", action="append", default=[], choices=["einsum", "gather"],
                 help="Dispatch method(s) to time (repeatable; default both).")
  m.add_argument("--group_size", action="append", type=int, default=[],
                 help="Routing group size(s) to time (repeatable; default the gin's).")
  m.add_argument("--data_parallel", type=int, default=-1)
  m.add_argument("--expert_parallel", type=int, default=1)
  m.add_argument("--model_parallel", type=int, default=1)
  m.add_argument("--dtype", default="auto",
                 help="Activation dtype: 'auto' keeps the gin's on accelerators and uses float32 on CPU.")
  m.add_argument("--json", action="store_true", help="Print one JSON object only.")


def _bench_model_and_config(args, bindings: Sequence[str]):
  """The model gin's MODEL at the requested dtype, and the benchmark shape/timing settings."""
  from repeat_lm import gin_utils
  from repeat_lm.bench import train as bench_train
  model = gin_utils.configured_macro(args.gin_file, bindings, "MODEL", args.gin_search_path)
  _warn_of_unused_run_settings(args)
  cfg = bench_train.BenchConfig(batch_size=args.batch_size, inputs_length=args.inputs_length,
                                targets_length=args.targets_length, steps=args.steps, rounds=args.rounds)
  return bench_train.with_dtype(model, args.dtype), cfg


def _warn_of_unused_run_settings(args) -> None:
  """bench takes the mesh and the batch's shape from its own flags; a run gin's (smoke.gin's DATA_PARALLEL=4,
  MODEL_PARALLEL=2), or a --gin.X binding of them, was accepted and then ignored without a word."""
  import gin  # pylint: disable=import-outside-toplevel
  config = gin.config._CONFIG  # pylint: disable=protected-access
  flags = {"DATA_PARALLEL": ("--data_parallel", args.data_parallel),
           "MODEL_PARALLEL": ("--model_parallel", args.model_parallel),
           "BATCH_SIZE": ("--batch_size", args.batch_size),
           "TASK_FEATURE_LENGTHS": ("--inputs_length/--targets_length",
                                    {"inputs": args.inputs_length, "targets": args.targets_length})}
  if hasattr(args, "expert_parallel"):  # bench moe's flag; bench train has none
    flags["EXPERT_PARALLEL"] = ("--expert_parallel", args.expert_parallel)
  bound = {name: config[(name, "gin.macro")].get("value") for name in flags if (name, "gin.macro") in config}
  # Only plain values: a %gin.REQUIRED or a reference is no setting to compare.
  unused = [f"{name}={value!r} (bench uses {flags[name][0]}={flags[name][1]!r})" for name, value in bound.items()
            if isinstance(value, (int, dict)) and value != flags[name][1]]
  if unused:
    logging.warning("bench %s takes the mesh and the batch from its flags, not the gin: %s %s not used.",
                    args.bench_command, "; ".join(unused), "is" if len(unused) == 1 else "are")


def _run_bench(args, bindings: Sequence[str]) -> dict:
  if args.bench_command == "moe":
    return _run_bench_moe(args, bindings)
  if args.bench_command == "data":
    return _run_bench_data(args)
  if args.bench_command == "accelerator":
    from repeat_lm.bench import accelerator
    accelerator.check_out(args.out)  # before measuring: what it would overwrite is checked first
    if args.profile_xplane and not os.path.isfile(args.profile_xplane):  # found missing only after every variant
      raise FileNotFoundError(f"--profile_xplane={args.profile_xplane}: no such file; pass the trace a profiled run "
                              "wrote (bench train --profile_dir), or leave the flag out.")
    if args.from_json:
      m = accelerator.read_json(args.from_json, "--from_json")
    else:
      previous = accelerator.read_json(args.previous, "--previous")["results"] if args.previous else []
      m = accelerator.measure(args.out, batch_size=args.batch_size, steps=args.steps, rounds=args.rounds,
                              time_budget_s=args.time_budget_s, variant_timeout_s=args.variant_timeout_s,
                              previous=previous,
                              variants=[accelerator.Variant.parse(v) for v in args.variant],
                              model_gin=args.gin_file or accelerator.MODEL_GIN)
    if args.profile_xplane:
      m["profile"] = accelerator.kernel_table(args.profile_xplane, args.profile_steps, args.profile_variant)
    accelerator.write(m, args.out)
    return {"written": args.out, "fastest": (accelerator.fastest(m["results"]) or {}).get("name")}
  if args.bench_command == "report":
    from repeat_lm.bench import report
    report.write(args.out, compare_hf=not args.no_hf)
    return {"written": args.out}
  from repeat_lm.bench import train as bench_train
  from repeat_lm.train import partitioning
  partitioner = partitioning.Partitioner(args.data_parallel, args.model_parallel)
  if args.compile_only and (args.compare or args.profile_dir):  # nothing runs for them to measure
    raise ValueError("--compile_only measures compilation alone: leave out "
                     + " and ".join(f for f, given in (("--compare", args.compare), ("--profile_dir", args.profile_dir))
                                    if given) + ".")
  if args.profile_dir:  # an unwritable folder failed after the timed rounds, and their numbers were lost
    os.makedirs(args.profile_dir, exist_ok=True)
  model, cfg = _bench_model_and_config(args, bindings)
  if args.compile_only:
    return bench_train.compile_only(model, cfg, partitioner)
  result = bench_train.run_benchmark(model, cfg, compare_hf=args.compare == "hf", partitioner=partitioner,
                                     profile_dir=args.profile_dir)
  if not args.json:
    print(bench_train.format_report(result), file=sys.stderr)
  return result


def _run_bench_moe(args, bindings: Sequence[str]) -> dict:
  from repeat_lm.bench import moe as bench_moe
  from repeat_lm.train import partitioning
  partitioner = partitioning.Partitioner(args.data_parallel, args.model_parallel, args.expert_parallel)
  model, cfg = _bench_model_and_config(args, bindings)
  result = bench_moe.run_moe_benchmark(model, cfg, dispatch=args.dispatch or ["einsum", "gather"],
                                       group_sizes=args.group_size, partitioner=partitioner)
  if not args.json:
    print(bench_moe.format_report(result), file=sys.stderr)
  return result


# ---- data ----

def _add_task_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--task", default=None, help="A registered task or a name of the scheme in docs/data.md.")
  p.add_argument("--split", default="train", choices=["train", "validation"])
  p.add_argument("--inputs_length", type=int, default=512)
  p.add_argument("--targets_length", type=int, default=114)
  p.add_argument("--seed", type=_seed, default=0)
  _add_corpus_args(p)


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("a corpus instead of --task")
  g.add_argument("--corpus", default=None, help="JSONL(.gz) file, directory or glob ('wiki': the default corpus).")
  g.add_argument("--vocab", default=None, help="SentencePiece model path, 't5' or 'wiki8k'.")
  g.add_argument("--unique_tokens", type=int, default=None, help="D: the subset's size in tokens.")
  g.add_argument("--epochs", type=int, default=None, help="E: how many times the subset is seen.")
  g.add_argument("--objective", default="span_corruption", help="span_corruption, ul2, or span_r<r>_mu<mu>.")
  g.add_argument("--static_masks", action="store_true", help="Masks fixed across epochs (default: re-drawn).")


def _task_from_args(args) -> str:
  from repeat_lm.data import tasks
  if (args.task is None) == (args.corpus is None):
    raise ValueError("Give either --task=NAME or --corpus=PATH (with --vocab, --unique_tokens, --epochs).")
  if args.task:
    # These define a corpus task; with --task they would be ignored and the statistics be of another subset.
    given = [f"--{k}" for k in ("vocab", "unique_tokens", "epochs") if getattr(args, k) is not None]
    given += ["--objective"] if args.objective != "span_corruption" else []
    given += ["--static_masks"] if args.static_masks else []
    if given:
      raise ValueError(f"{', '.join(given)} describe a --corpus task; --task={args.task} fixes its own budget, "
                       "epochs, vocabulary, objective and masks (name them in the task name, docs/data.md).")
    return tasks.ensure_registered(args.task)
  return tasks.repeated_task(corpus=args.corpus, vocabulary=args.vocab, objective=args.objective,
                             unique_tokens=args.unique_tokens, epochs=args.epochs, static_masks=args.static_masks)


def _add_data(sub) -> None:
  p = sub.add_parser("data", help="Inspect a task: `data stats` (one JSON object), `data show` (decoded examples).")
  data_sub = p.add_subparsers(dest="data_command", required=True)
  s = data_sub.add_parser("stats", help="Measured examples, tokens, noise, epochs and per-document repeat counts.")
  _add_task_args(s)
  s.add_argument("--max_examples", type=int, default=None,
                 help="Measure only the first N examples (default: all; one epoch of an unbounded task).")
  sh = data_sub.add_parser("show", help="Print decoded examples (inputs with sentinels, targets).")
  _add_task_args(sh)
  sh.add_argument("-n", type=int, default=3, help="How many examples.")
  sh.add_argument("--start", type=int, default=0, help="Global index of the first example.")


def _run_data(args, bindings: Sequence[str]) -> dict | None:
  del bindings
  from repeat_lm.data import stats
  task = _task_from_args(args)
  lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
  # task_stats and show_examples check the counts and --start (stats.check_selection) before reading an example.
  if args.data_command == "stats":
    return stats.task_stats(task, args.split, args.max_examples, lengths, args.seed)
  print(stats.format_examples(stats.show_examples(task, args.n, args.split, args.start, lengths, args.seed)))
  return None


BENCH_DATA_TASK = "repeat_lm.wiki_span_corruption"


def _add_bench_data(bench_sub) -> None:
  d = bench_sub.add_parser("data", help="Examples/s and tokens/s of the input pipeline, as the trainer reads it.")
  d.add_argument("--task", default=None, help=f"A registered task or a name of the scheme in docs/data.md (default, "
                 f"without --corpus: {BENCH_DATA_TASK}).")
  d.add_argument("--split", default="train", choices=["train", "validation"])
  # The smoke run's shapes (gin/runs/smoke.gin), not bench train's 512/114: the pipeline's own cost, quickly.
  d.add_argument("--batch_size", type=int, default=16, help="Global batch size (default 16, as the smoke run).")
  d.add_argument("--inputs_length", type=int, default=128, help="Default 128, as the smoke run (T5: 512).")
  d.add_argument("--targets_length", type=int, default=32, help="Default 32, as the smoke run (T5: 114).")
  d.add_argument("--steps", type=int, default=50, help="Timed host batches.")
  d.add_argument("--num_shards", type=int, default=1, help="Hosts: time one host's share of each global batch.")
  d.add_argument("--seed", type=_seed, default=0)
  d.add_argument("--train_step_s", type=float, default=None, help="Training step time to compare against.")
  d.add_argument("--json", action="store_true", help="Print one JSON object only.")
  # The corpus tasks `data stats` and `data show` reach (a local JSONL subset, the T5 vocabulary, UL2): their names
  # are registered by the process that builds them, so --task cannot name one in a new process.
  _add_corpus_args(d)


def _run_bench_data(args) -> dict:
  from repeat_lm.bench import data as bench_data
  from repeat_lm.data import pipeline
  if args.task is None and args.corpus is None:
    args.task = BENCH_DATA_TASK
  cfg = pipeline.DatasetConfig(_task_from_args(args),
                               {"inputs": args.inputs_length, "targets": args.targets_length}, split=args.split,
                               batch_size=args.batch_size, seed=args.seed,
                               # as training reads the train split, and evaluation the validation split: one
                               # ordered pass (gin/runs/eval.gin), not a shuffled unending stream
                               shuffle=args.split == "train")
  result = bench_data.run_benchmark(cfg, bench_data.DataBenchConfig(steps=args.steps, num_shards=args.num_shards,
                                                                    train_step_s=args.train_step_s))
  if not args.json:
    print(bench_data.format_report(result), file=sys.stderr)
  return result


# ---- model-info ----

def _add_model_info(sub) -> None:
  p = sub.add_parser("model-info", help="Parameters and training FLOPs of a model gin (one JSON object), or of the "
                     "whole model zoo.", description="Gin bindings: --gin.KEY=VALUE apply to the model gin.")
  _add_gin_args(p)
  p.add_argument("--inputs_length", type=int, default=512)
  p.add_argument("--targets_length", type=int, default=114)
  p.add_argument("--dense_reference", default=None,
                 help="Model gin to compare with (flops_ratio_to_reference), e.g. gin/models/t5_1_1_large.gin.")
  p.add_argument("--zoo", action="store_true", help="Every model of the zoo with its reference (docs/models.md).")
  p.add_argument("--markdown", action="store_true", help="With --zoo: print the markdown table.")
  p.add_argument("--update_doc", default=None,
                 help="With --zoo: rewrite the generated table block of this markdown file (docs/models.md).")


def _run_model_info(args, bindings: Sequence[str]) -> dict | None:
  from repeat_lm import gin_utils
  from repeat_lm.models import info
  from repeat_lm.train import flops
  try:  # the counter's own check, before any gin is parsed; the message names the flags
    flops.check_lengths(args.inputs_length, args.targets_length)
  except ValueError:
    raise ValueError(f"--inputs_length={args.inputs_length} and --targets_length={args.targets_length}: FLOPs per "
                     "sequence need lengths >= 1.") from None
  if args.zoo:
    ignored = [flag for flag, given in (("--gin_file", args.gin_file), ("--gin_search_path", args.gin_search_path),
                                        ("--gin.KEY=VALUE", bindings), ("--dense_reference", args.dense_reference))
               if given]
    if ignored:  # the zoo is gin/models' own files with their fixed references
      raise ValueError(f"model-info --zoo takes no {', '.join(ignored)}: it reports the zoo's gins as they are.")
    rows = info.zoo(args.inputs_length, args.targets_length)
    if args.update_doc:
      info.update_doc(args.update_doc, info.zoo_markdown(rows))
      return None
    if args.markdown:
      print(info.zoo_markdown(rows), end="")
      return None
    return {"models": rows}
  if args.markdown or args.update_doc:
    raise ValueError("--markdown and --update_doc need --zoo (one model prints a JSON object).")
  if not args.gin_file:
    raise ValueError("model-info needs a model gin (--gin_file=gin/models/t5_1_1_base.gin) or --zoo.")
  config = info.model_config(gin_utils.configured_macro(args.gin_file, bindings, "MODEL", args.gin_search_path))
  reference = (info.load_config(args.dense_reference, (), args.gin_search_path) if args.dense_reference
               else None)
  return info.model_info(config, args.inputs_length, args.targets_length, reference)


# ---- analyze / plan (docs/analysis.md) ----

_LAWS = ["chinchilla", "data-constrained"]


def _add_analyze(sub) -> None:
  p = sub.add_parser("analyze", help="Analyse a results table of `repeat-lm collect`: degradation, fit, predict, "
                     "chinchilla-check, proxy; each writes PNG plots and report.{md,html} (docs/analysis.md).")
  a = p.add_subparsers(dest="analyze_command", required=True)

  def table(q, name: str) -> None:
    q.add_argument("--results", required=True, help="Table written by `repeat-lm collect` (.csv or .parquet).")
    q.add_argument("--out", default=None, help=f"Report folder (default: analysis/{name} next to the table "
                   f"results.csv, analysis/<table name>/{name} next to another table).")
    q.add_argument("--json", action="store_true", help="Print one JSON object instead of the Markdown report.")

  d = a.add_parser("degradation", help="Best, final, gap and onset of degradation per run, plots by factor.")
  table(d, "degradation")
  d.add_argument("--metric", choices=["eval/accuracy", "eval/loss"], default="eval/accuracy")
  d.add_argument("--group_by", "--group-by", default=None, help="Column to group plots by (default: every "
                 "varied factor).")
  d.add_argument("--tolerance", type=float, default=None, help="Onset tolerance in metric units (default: 0.5%% "
                 "of the run's best value).")
  d.add_argument("--baseline", default=None, help="The unrepeated baseline run(s), a glob on `run` or COL=VALUE: "
                 "each other run's cost against its baseline at equal tokens seen.")
  d.add_argument("--match", type=_columns, default=(), help="Columns a run shares with its baseline "
                 "(COL[,COL]), when the table holds several baselines (e.g. one per model size).")
  f = a.add_parser("fit", help="Fit a scaling law (Huber on log residuals, L-BFGS-B from a grid) with bootstrap "
                   "intervals.")
  table(f, "fit_<law>")
  f.add_argument("--law", choices=_LAWS, required=True)
  f.add_argument("--bootstrap", type=int, default=100, help="Bootstrap refits for the intervals (0: none).")
  f.add_argument("--seed", type=_seed, default=0)
  f.add_argument("--max_epochs", type=float, default=None, help="Fit only runs with at most this many epochs.")
  c = a.add_parser("chinchilla-check", help="Do tokens need to grow linearly with parameters? (b / a of the "
                   "compute-optimal exponents, with its interval).")
  table(c, "chinchilla_check")
  c.add_argument("--law", choices=["auto", *_LAWS], default="auto",
                 help="auto: data-constrained if any run repeats data, else chinchilla.")
  c.add_argument("--bootstrap", type=int, default=100)
  c.add_argument("--seed", type=_seed, default=0)
  x = a.add_parser("proxy", help="RQ4: a dropout sweep on an MoE proxy vs the dense model: best rates, rank "
                   "agreement, curve similarity, tuning cost.")
  table(x, "proxy")
  x.add_argument("--sweep", required=True, help="The MoE sweep: a glob on `run` or COL=VALUE[,COL=VALUE].")
  x.add_argument("--dense", required=True, help="The dense run(s), same syntax.")
  x.add_argument("--metric", choices=["eval/accuracy", "eval/loss"], default="eval/accuracy")
  x.add_argument("--rate_column", default=None, help="Default: the column whose name contains 'dropout'.")
  x.add_argument("--price_per_chip_hour", "--price-per-chip-hour", type=float, default=None, help="USD.")
  x.add_argument("--chip_flops_per_s", type=float, default=None,
                 help="Achieved FLOP/s per chip, for chip-hours when the table has no chip_hours column.")
  pr = a.add_parser("predict", help="Predicted loss of N parameters trained on D tokens (U unique).")
  pr.add_argument("--law", choices=_LAWS, required=True)
  pr.add_argument("--params", type=float, required=True)
  pr.add_argument("--tokens", type=float, required=True)
  pr.add_argument("--unique-tokens", "--unique_tokens", dest="unique_tokens", type=float, default=None)
  pr.add_argument("--constants", default=None, help="JSON constants (e.g. `analyze fit --json`); default: the "
                  "published ones.")
  pr.add_argument("--json", action="store_true")


def _default_analysis_dir(results_path, cmd: str, law: str | None):
  """analysis/COMMAND next to the table (`collect`'s results.csv), analysis/STEM/COMMAND for a table of another name;
  a fit's folder names its law. One folder for every table and law of a folder let one report silently replace
  another's, which named neither table nor law."""
  base = results_path.parent / "analysis"
  if results_path.stem != "results":
    base = base / results_path.stem
  name = cmd.replace("-", "_") + (f"_{law.replace('-', '_')}" if cmd == "fit" and law else "")
  return base / name


def _run_analyze(args, bindings: Sequence[str]) -> dict | None:
  del bindings
  from pathlib import Path

  from repeat_lm.analysis import degradation, laws, proxy, results, scaling
  cmd = args.analyze_command
  if cmd == "predict":
    # The fit's own record (`analyze fit --json`) says what it did not determine and which counts it saw.
    fit = laws.read_record(args.constants, "--constants") if args.constants else None
    constants = laws.constants_for(args.law, args.constants, "--constants", record=fit)
    out = scaling.prediction(constants, args.params, args.tokens, args.unique_tokens, fit)
    if not args.json:
      print(f"predicted loss ({args.law}): {out['loss']:.4f}" + (f" ({out['note']})" if "note" in out else ""))
      return None
    return out
  runs = results.read_results(args.results)
  out_dir = Path(args.out) if args.out else _default_analysis_dir(Path(args.results), cmd, getattr(args, "law", None))
  if cmd == "degradation":
    if args.match and not args.baseline:
      raise ValueError("--match pairs runs with a --baseline; give --baseline too.")
    out = degradation.analyze(runs, out_dir, metric=args.metric, group_by=args.group_by, tolerance=args.tolerance,
                              baseline=args.baseline, match=args.match)
  elif cmd == "fit":
    out = scaling.fit_report(runs, args.law, out_dir, bootstrap=args.bootstrap, seed=args.seed,
                             max_epochs=args.max_epochs)
  elif cmd == "chinchilla-check":
    out = scaling.chinchilla_check(runs, out_dir, law=args.law, bootstrap=args.bootstrap, seed=args.seed)
  else:
    out = proxy.analyze(runs, args.sweep, args.dense, out_dir, metric=args.metric, column=args.rate_column,
                        price_per_chip_hour=args.price_per_chip_hour, chip_flops_per_s=args.chip_flops_per_s)
  if args.json:
    return out
  print(Path(out_dir / "report.md").read_text())
  print(f"Report: {out_dir / 'report.html'}")
  return None


def _add_plan(sub) -> None:
  p = sub.add_parser("plan", help="Token-crisis planner: parameters, tokens and epochs for U unique tokens and C "
                     "FLOPs under the data-constrained law (docs/analysis.md).")
  p.add_argument("--unique-tokens", "--unique_tokens", dest="unique_tokens", type=float, required=True)
  p.add_argument("--compute", type=float, required=True, help="Training FLOPs C (= 6 N D).")
  p.add_argument("--law-constants", "--law_constants", dest="law_constants", default=None,
                 help="JSON constants of the data-constrained law, e.g. what `analyze fit --json` prints (the plan "
                 "then warns of what the fit did not determine); default: Muennighoff et al.'s C4 fit.")
  p.add_argument("--results", default=None, help="A results table: cite its best dropout rate at similar size.")
  p.add_argument("--out", default=None, help="Also write plan_loss_vs_params.png and report.{md,html} here.")
  p.add_argument("--json", action="store_true")


def _run_plan(args, bindings: Sequence[str]) -> dict | None:
  del bindings
  from repeat_lm.analysis import laws, planner, results
  runs = results.read_results(args.results) if args.results else None
  # The whole record, not only its constants: the plan warns of what the fit did not determine.
  fit = laws.read_record(args.law_constants) if args.law_constants else None
  p = planner.plan(args.unique_tokens, args.compute,
                   laws.constants_for("data-constrained", args.law_constants, record=fit), runs, fit)
  if args.out:
    p["report"] = planner.write_plan_report(p, args.out)
  if not args.json:
    print(planner.summary(p))
    return None
  return p


# ---- sweep / collect / run-status / launch-local (docs/experiments.md) ----

def _add_sweep(sub) -> None:
  p = sub.add_parser("sweep", help="Expand an experiment gin (gin/experiments/) into named runs under ROOT, write "
                     "each run's gin and run what is not finished (docs/experiments.md).",
                     description="Gin bindings --gin.KEY=VALUE apply to every run, after the experiment's.")
  p.add_argument("--experiment", required=True, help="Experiment gin, e.g. gin/experiments/rq1_repetition_cpu.gin.")
  p.add_argument("--root", required=True, help="Sweep directory: ROOT/RUN is each run's MODEL_DIR.")
  p.add_argument("--launcher", choices=["local", "tpu-vm", "slurm"], default="local",
                 help="local: subprocesses, one run after another; tpu-vm / slurm: print (or --submit) commands.")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="Write the runs' gins and print their commands; run nothing.")
  p.add_argument("--only", default=None, help="Comma-separated globs on run names, e.g. 'd27_*,d35_e0'.")
  p.add_argument("--submit", action="store_true", help="tpu-vm / slurm: run or submit the commands.")
  p.add_argument("--tpu", default=None, help="tpu-vm: the TPU VM's name.")
  p.add_argument("--zone", default=None, help="tpu-vm: its zone.")
  p.add_argument("--project", default=None, help="tpu-vm: its project (default: gcloud's).")
  p.add_argument("--sbatch_arg", action="append", default=[], help="slurm: extra sbatch argument (repeatable), e.g. "
                 "--sbatch_arg=--nodes=4.")


def _run_sweep(args, bindings: Sequence[str]) -> dict:
  from repeat_lm.experiments import runner
  opts = runner.Options(launcher=args.launcher, dry_run=args.dry_run, only=args.only, submit=args.submit,
                        tpu=args.tpu, zone=args.zone, project=args.project, sbatch_args=args.sbatch_arg,
                        bindings=bindings)
  try:
    result = runner.run_sweep(args.experiment, args.root, opts)
  except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the current run checkpointed and was left pending
    raise RuntimeError(f"sweep interrupted ({str(e) or 'Ctrl-C'}); run the same command again to resume.") from e
  if result.get("uncomposed") and args.dry_run:
    # A dry run is how an experiment is checked before it is queued for days: one whose runs' gins do not compose
    # exited 0, its failures only inside the JSON.
    print(json.dumps(strict_json(result), sort_keys=True, allow_nan=False))
    raise RuntimeError(f"{len(result['uncomposed'])} run(s) could not be composed: " + "; ".join(
        f"{k}: {v}" for k, v in result["uncomposed"].items()) + f" (the other runs' gins are written under "
        f"{args.root}); fix the experiment gin or the --gin bindings.")
  if result["failed"] and not args.dry_run:
    print(json.dumps(strict_json(result), sort_keys=True, allow_nan=False))
    raise RuntimeError(f"{len(result['failed'])} run(s) failed: " + "; ".join(
        f"{k}: {v}" for k, v in result["failed"].items()) + f". Logs: {args.root}/RUN/train.log; re-running the "
        "sweep retries them (a diverged run once its settings change).")
  return result


def _add_collect(sub) -> None:
  p = sub.add_parser("collect", help="Every run of a sweep ROOT as one row (status, varied gin values, params, "
                     "FLOPs, data, final/best validation metrics, fine-tuning scores): the table `analyze` reads.")
  p.add_argument("--root", required=True, help="Sweep directory (`repeat-lm sweep --root`).")
  p.add_argument("--out", default=None, help="results.csv or results.parquet (default: ROOT/results.csv).")


def _run_collect(args, bindings: Sequence[str]) -> dict:
  del bindings
  from pathlib import Path

  from repeat_lm.experiments import collect
  out = args.out or str(Path(args.root) / "results.csv")
  rows = collect.collect(args.root, out)
  counts: dict[str, int] = {}
  for r in rows:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  warnings = collect.moe_warnings(rows) + collect.metrics_warnings(rows)
  for line in warnings:
    logging.warning("%s", line)
  return {"out": out, "rows": len(rows), "status": counts, **({"warnings": warnings} if warnings else {})}


def _add_run_status(sub) -> None:
  p = sub.add_parser("run-status", help="Record a sweep run's start or exit in ROOT/RUN/status.json (used by "
                     "launch/slurm.sbatch).")
  p.add_argument("--run_dir", required=True)
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--started", action="store_true")
  g.add_argument("--exit_code", type=int, default=None)
  p.add_argument("--log", default=None, help="The run's log, for the error text of a failed run.")


def _run_run_status(args, bindings: Sequence[str]) -> dict:
  del bindings
  from repeat_lm.experiments import status
  # An exit status is 0-255; -N is a process killed by signal N (Python's returncode). Anything else is a typo.
  if args.exit_code is not None and not -255 <= args.exit_code <= 255:
    raise ValueError(f"--exit_code={args.exit_code} is no exit status: pass the command's $? (0-255).")
  # An existing run directory, and a run not yet finished (another exit 0 of a complete one is the same record).
  status.check_recordable(args.run_dir, None if args.started else args.exit_code)
  # launch/slurm.sbatch: the attempt is the job's (squeue tells whether it lives), not this short-lived process's.
  record = status.started(args.run_dir, job_id=os.environ.get("SLURM_JOB_ID")) if args.started else \
      status.exited(args.run_dir, args.exit_code, args.log)
  return {"status": record["status"], "error": record.get("error")}


def _add_launch_local(sub) -> None:
  p = sub.add_parser("launch-local", help="Run a repeat-lm command as N local processes joined by jax.distributed "
                     "(CPU devices split between them), e.g. `launch-local --num_processes=2 -- train ...`.")
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=4)
  p.add_argument("--port", type=int, default=None, help="Coordinator port on 127.0.0.1 (default: a free one).")
  p.add_argument("argv", nargs=argparse.REMAINDER, help="The repeat-lm command and its arguments, after `--`.")


def _run_launch_local(args, bindings: Sequence[str]) -> None:
  from repeat_lm.experiments import launch_local
  argv = [a for a in args.argv if a != "--"] + [f"--gin.{b}" for b in bindings]
  if not argv:
    raise ValueError("launch-local needs a command: repeat-lm launch-local --num_processes=2 -- train --gin_file=...")
  code = launch_local.launch(argv, args.num_processes, args.devices_per_process, args.port)
  if code:
    # Its own status, not 2: a wrapper (a job script, CI) tells an interrupted launch (130), a killed process (128 +
    # the signal, as a shell reports one; Python's returncode is -signal) and a stopped trainer (75) from a bad
    # setting by the exit status.
    raise CommandExit(code if code > 0 else 128 - code,
                      f"A process of `repeat-lm {' '.join(argv)}` exited with code {code}"
                      f"{f' (killed by signal {-code})' if code < 0 else ''}.")


# ---- demo (docs/demo.md) ----

def _add_demo(sub) -> None:
  p = sub.add_parser("demo", help="Fresh vs repeated data vs repeated data with dropout: three tiny-T5 runs on the "
                     "default local corpus, then report.html, plots and summary.json (docs/demo.md).")
  p.add_argument("--out", default="runs/demo", help="Output folder; running again reuses its finished runs.")
  p.add_argument("--seed", type=_seed, default=0, help="Seed of initialisation, data order and masks.")
  p.add_argument("--quick", action="store_true", help="A few dozen steps per run (checks the plumbing only).")
  p.add_argument("--steps", type=int, default=None,
                 help="Training steps per run, at most the whole budget (the default).")


def _run_demo(args, bindings: Sequence[str]) -> None:
  from repeat_lm import demo
  if bindings:
    raise ValueError("demo takes no --gin bindings; its runs' settings are in repeat_lm/demo.py.")
  demo.run_demo(args.out, seed=args.seed, quick=args.quick, steps=args.steps)


COMMANDS = {
    "demo": (_add_demo, _run_demo),
    "train": (_add_train, _run_gin_command),
    "finetune": (_add_finetune, _run_gin_command),
    "eval": (_add_eval, _run_gin_command),
    "infer": (_add_infer, _run_infer),
    "export": (_add_export, _run_export),
    "bench": (_add_bench, _run_bench),
    "model-info": (_add_model_info, _run_model_info),
    "data": (_add_data, _run_data),
    "analyze": (_add_analyze, _run_analyze),
    "plan": (_add_plan, _run_plan),
    "sweep": (_add_sweep, _run_sweep),
    "collect": (_add_collect, _run_collect),
    "run-status": (_add_run_status, _run_run_status),
    "launch-local": (_add_launch_local, _run_launch_local),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="repeat-lm", description="Pre-train T5-style models on repeated data.")
  # Checked here: logging.basicConfig refused an unknown name (--log_level=verbose) with a traceback.
  parser.add_argument("--log_level", default="INFO", type=str.upper, choices=list(logging.getLevelNamesMapping()),
                      help="Python logging level (case-insensitive).")
  sub = parser.add_subparsers(dest="command", required=True)
  for add, _ in COMMANDS.values():
    add(sub)
  return parser


def strict_json(value: Any) -> Any:
  """`value` with every non-finite float as None (JSON null): `--json` prints one JSON object, and strict parsers (jq,
  JSON.parse, Go's encoding/json) reject Python's NaN / Infinity, which a diverged run or a run without a curve has."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  return value


def main(argv: Sequence[str] | None = None) -> int:
  from repeat_lm.train import distributed
  try:
    code = _main(argv)
  except Exception:  # pylint: disable=broad-except  # reported as Python would, then the exit below
    if not distributed.initialized():
      raise
    traceback.print_exc()
    code = 1
  # One of several processes that failed exits now: waiting for the others to shut down, it hid its failure from the
  # launcher for minutes while they waited for it in a collective.
  distributed.exit_if_failed(code)
  return code


def _main(argv: Sequence[str] | None) -> int:
  from repeat_lm import runtime
  if argv is None:  # a command line, not a call from Python: may re-execute with the host allocator settings
    runtime.configure_host_allocator()
  argv = list(sys.argv[1:] if argv is None else argv)
  runtime.configure_xla_flags()  # Before anything starts a JAX backend.
  from repeat_lm import gin_utils
  try:
    bindings, rest = gin_utils.split_gin_args(argv)
  except gin_utils.GinConfigError as e:
    print(f"repeat-lm: error: {e}", file=sys.stderr)
    return 2
  args = build_parser().parse_args(rest)
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    result = COMMANDS[args.command][1](args, bindings)
    if result is not None:
      print(json.dumps(strict_json(result), sort_keys=True, allow_nan=False))
  except CommandExit as e:
    print(f"repeat-lm: error: {e}", file=sys.stderr)
    return e.code
  except BrokenPipeError:
    # The reader left (`repeat-lm ... | head`): not a full disk. Quiet, as other tools killed by SIGPIPE are; stdout
    # goes to /dev/null so that the interpreter's last flush does not raise again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + 13
  except OSError as e:
    # The OS error names the path; say what to change (the FileNotFoundErrors and FileExistsErrors repeat_lm raises
    # itself already do: they carry no errno, the operating system's do).
    hint = ("" if e.errno is None and isinstance(e, (FileNotFoundError, FileExistsError, PermissionError)) else
            ". The file system is read-only: write the output somewhere writable" if e.errno == errno.EROFS else
            ". Check the path: an input must exist, and an output's folder must be one that can be created"
            if isinstance(e, FileNotFoundError) else
            ". Check the paths given on the command line: an output must be a writable file or directory path whose "
            "parent folders are directories" if isinstance(e, (IsADirectoryError, NotADirectoryError, FileExistsError,
                                                                PermissionError)) else
            ". Free space, or write the output elsewhere")  # ENOSPC, EIO, ...: e.g. a full disk
    print(f"repeat-lm: error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
    return 2
  except (gin_utils.GinConfigError, RuntimeError, ValueError) as e:
    if isinstance(e, (RuntimeError, ValueError)) and not isinstance(e, gin_utils.GinConfigError) and \
        args.log_level.upper() == "DEBUG":
      raise
    print(f"repeat-lm: error: {type(e).__name__}: {e}" if not isinstance(e, gin_utils.GinConfigError)
          else f"repeat-lm: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
