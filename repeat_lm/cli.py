"""`repeat-lm`: the only place that parses command-line arguments.

Each subcommand has an `_add_<name>` function that declares its arguments and a `_run_<name>` function that calls
into the library; `COMMANDS` lists them. Library code never sees argparse objects.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


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


def _run_gin_command(args, bindings: Sequence[str]) -> dict:
  from repeat_lm import gin_utils
  from repeat_lm.train import distributed
  distributed.maybe_initialize()
  from repeat_lm.train import trainer
  gin_utils.parse(args.gin_file, bindings, args.gin_search_path)
  fn = trainer.train if args.command == "train" else trainer.evaluate
  return gin_utils.call_configured(fn)


# ---- bench ----

def _add_bench(sub) -> None:
  p = sub.add_parser("bench", help="Benchmarks: `bench train` times the compiled training step.")
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
                 help="Activation dtype: 'auto' keeps the gin's on accelerators and uses float32 on CPU.")
  t.add_argument("--compare", choices=["hf"], default=None, help="Also time Hugging Face's PyTorch T5, interleaved.")
  t.add_argument("--json", action="store_true", help="Print one JSON object only.")


def _run_bench(args, bindings: Sequence[str]) -> dict:
  from repeat_lm import gin_utils
  from repeat_lm.bench import train as bench_train
  from repeat_lm.train import partitioning
  model = gin_utils.configured_macro(args.gin_file, bindings, "MODEL", args.gin_search_path)
  model = bench_train.with_dtype(model, args.dtype)
  cfg = bench_train.BenchConfig(batch_size=args.batch_size, inputs_length=args.inputs_length,
                                targets_length=args.targets_length, steps=args.steps, rounds=args.rounds)
  partitioner = partitioning.Partitioner(args.data_parallel, args.model_parallel)
  result = bench_train.run_benchmark(model, cfg, compare_hf=args.compare == "hf", partitioner=partitioner)
  if not args.json:
    print(bench_train.format_report(result), file=sys.stderr)
  return result


COMMANDS = {
    "train": (_add_train, _run_gin_command),
    "eval": (_add_eval, _run_gin_command),
    "bench": (_add_bench, _run_bench),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="repeat-lm", description="Pre-train T5-style models on repeated data.")
  parser.add_argument("--log_level", default="INFO")
  sub = parser.add_subparsers(dest="command", required=True)
  for add, _ in COMMANDS.values():
    add(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
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
  except (gin_utils.GinConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
    if isinstance(e, (RuntimeError, ValueError)) and not isinstance(e, gin_utils.GinConfigError) and \
        args.log_level.upper() == "DEBUG":
      raise
    print(f"repeat-lm: error: {type(e).__name__}: {e}" if not isinstance(e, gin_utils.GinConfigError)
          else f"repeat-lm: error: {e}", file=sys.stderr)
    return 2
  if result is not None:
    print(json.dumps(result, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
