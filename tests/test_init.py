"""repeat_lm/__init__.py: TensorFlow and triton in one process."""

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or importlib.util.find_spec("transformers") is None,
                    reason="needs triton and transformers (PyTorch's CUDA builds bring triton; its CPU build has none)")
def test_a_hugging_face_model_builds_after_a_data_pipeline_in_one_process():
  """The data modules load TensorFlow; a Hugging Face model built after them loads triton, which segfaulted in
  dlopen (tensorflow/tensorflow#124205) until `import repeat_lm` loaded triton first. In a child process, so that a
  crash fails this test rather than the test run."""
  code = ("import repeat_lm.data.tasks, sys, transformers; assert 'tensorflow' in sys.modules; "
          "transformers.T5ForConditionalGeneration(transformers.T5Config(d_model=8, d_ff=8, d_kv=4, num_layers=1, "
          "num_heads=1, vocab_size=16))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
