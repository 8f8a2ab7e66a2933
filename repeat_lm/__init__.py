"""repeat_lm: pre-training T5-style models under the token crisis (README.md)."""

import importlib.util as _importlib_util
import sys as _sys


def _load_triton_before_tensorflow() -> None:
  """Load triton now where it is installed and TensorFlow is not loaded yet.

  TensorFlow's wheels from 2.20 on load its library with RTLD_GLOBAL, which puts its statically linked LLVM in the
  global symbol table; a triton (3.7) loaded after it binds its own LLVM calls to that copy and the process dies
  in dlopen (SIGSEGV; tensorflow/tensorflow#124205, reproduced by `import tensorflow; import triton`). The data
  modules import TensorFlow (SeqIO), and PyTorch's CUDA builds, which the `hf` and `test` extras install on most
  Linux hosts, import triton lazily: the first Hugging Face model built after a data pipeline in one process
  crashed it. Loaded in this order both work. Costs ~0.2 s on import where triton is installed, nothing elsewhere.
  """
  if "tensorflow" in _sys.modules or _importlib_util.find_spec("triton") is None:
    return
  try:
    import triton  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except Exception:  # pylint: disable=broad-except
    pass  # a triton that cannot load (no compiler, an ABI mismatch) is not repeat_lm's to fix; PyTorch loads it lazily


_load_triton_before_tensorflow()
