"""`python -m repeat_lm.train --gin_file=...`: the same as `repeat-lm train`, for T5X habits."""

import sys

from repeat_lm import cli

sys.exit(cli.main(["train", *sys.argv[1:]]))
