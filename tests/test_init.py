"""repeat_lm/__init__.py: TensorFlow and triton in one process."""

import importlib.util
import os
import subprocess
import sys

import pytest

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("transformers") is None,
    reason="needs triton and transformers (PyTorch's CUDA builds bring triton; its CPU build has none)")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
  """`code` in a child process, so that a crash fails the test rather than the test run."""
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                        env={**os.environ, **env})


@needs_triton
def test_a_hugging_face_model_builds_after_a_data_pipeline_in_one_process():
  """The data modules load TensorFlow; a Hugging Face model built after them loads triton, which segfaulted in
  dlopen (tensorflow/tensorflow#124205) until `import repeat_lm` loaded triton first."""
  result = _run("import repeat_lm.data.tasks, sys, transformers; assert 'tensorflow' in sys.modules; "
                "transformers.T5ForConditionalGeneration(transformers.T5Config(d_model=8, d_ff=8, d_kv=4, "
                "num_layers=1, num_heads=1, vocab_size=16)); assert 'triton' in sys.modules")
  assert result.returncode == 0, result.stderr[-2000:]
  # The upstream reproducer, whatever transformers loads.
  result = _run("import repeat_lm.data.tasks, triton")
  assert result.returncode == 0, result.stderr[-2000:]


@needs_triton
def test_after_tensorflow_triton_is_left_alone_with_a_warning():
  """Loading triton then would be the crash itself; the user is told the import order that works."""
  result = _run("import sys, tensorflow, repeat_lm; assert 'triton' not in sys.modules")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Import repeat_lm, or triton, before TensorFlow" in result.stderr


@needs_triton
def test_the_preload_can_be_turned_off():
  result = _run("import sys, repeat_lm; assert 'triton' not in sys.modules", REPEAT_LM_PRELOAD_TRITON="0")
  assert result.returncode == 0, result.stderr[-2000:]
