"""`repeat-lm`: the only place that parses command-line arguments."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def _gin_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
  p = sub.add_parser(name, help=help_text,
                     description=help_text + " Gin bindings: --gin.KEY=VALUE (repeatable), as in T5X.")
  p.add_argument("--gin_file", action="append", default=[], help="Gin file (repeatable; later files win).")
  p.add_argument("--gin_search_path", action="append", default=[], help="Extra directory for gin includes.")
  return p


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="repeat-lm", description="Pre-train T5-style models on repeated data.")
  parser.add_argument("--log_level", default="INFO")
  sub = parser.add_subparsers(dest="command", required=True)
  _gin_parser(sub, "train", "Train (or resume) the model of the gin config into MODEL_DIR.")
  _gin_parser(sub, "eval", "Evaluate a checkpoint of MODEL_DIR on the evaluation split.")
  return parser


def _run_gin_command(args, bindings: Sequence[str]) -> dict:
  from repeat_lm import gin_utils
  from repeat_lm.train import distributed
  distributed.maybe_initialize()
  from repeat_lm.train import trainer
  gin_utils.parse(args.gin_file, bindings, args.gin_search_path)
  fn = trainer.train if args.command == "train" else trainer.evaluate
  return gin_utils.call_configured(fn)


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
    result = _run_gin_command(args, bindings)
  except (gin_utils.GinConfigError, FileNotFoundError) as e:
    print(f"repeat-lm: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
