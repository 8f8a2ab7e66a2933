"""repeat_lm: pre-training T5-style models under the token crisis (README.md)."""

import importlib.util as _importlib_util
import os as _os
import sys as _sys
import warnings as _warnings

# Set to 0 to leave triton to be loaded when PyTorch asks for it (see _load_triton_before_tensorflow).
PRELOAD_TRITON_ENV = "REPEAT_LM_PRELOAD_TRITON"


def _load_triton_before_tensorflow() -> None:
  """Load triton now where it is installed and TensorFlow is not loaded yet.

  TensorFlow's wheels from 2.20 on load its library with RTLD_GLOBAL, which puts its statically linked LLVM in the
  global symbol table; a triton (3.7) loaded after it binds its own LLVM calls to that copy and the process dies
  in dlopen (SIGSEGV; tensorflow/tensorflow#124205, reproduced by `import tensorflow; import triton`). The data
  modules import TensorFlow (SeqIO), and PyTorch's CUDA builds, which the `hf` and `test` extras install on most
  Linux hosts, import triton lazily: the first Hugging Face model built after a data pipeline in one process
  crashed it. Loaded in this order both work. The cost, where triton is installed: 0.2-0.4 s and ~90 MiB of
  memory in each process that imports repeat_lm. Drop this once the pinned TensorFlow includes
  tensorflow/tensorflow#124230 (its shared wheels load without RTLD_GLOBAL again).
  """
  if _os.environ.get(PRELOAD_TRITON_ENV, "1") == "0" or "triton" in _sys.modules:
    return
  if _importlib_util.find_spec("triton") is None:
    return
  if "tensorflow" in _sys.modules:  # too late: loading triton now is the crash itself
    _warnings.warn("TensorFlow was imported before repeat_lm, and triton is installed: the first time PyTorch loads "
                   "triton in this process (building a Hugging Face model does) the process will crash "
                   "(tensorflow/tensorflow#124205). Import repeat_lm, or triton, before TensorFlow.", stacklevel=2)
    return
  try:
    import triton  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except Exception:  # pylint: disable=broad-except
    pass  # a triton that cannot load is PyTorch's to report when it asks for it, not every import's


_load_triton_before_tensorflow()
