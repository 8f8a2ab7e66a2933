"""`python -m repeat_lm.train --gin_file=...`: the same as `repeat-lm train`, for T5X habits."""

import sys

from repeat_lm import runtime

# A command line like `repeat-lm train`: the same host allocator settings (cli.main applies them only when it reads
# sys.argv itself, and here it is given the argument list).
runtime.configure_host_allocator()

from repeat_lm import cli  # noqa: E402

sys.exit(cli.main(["train", *sys.argv[1:]]))
