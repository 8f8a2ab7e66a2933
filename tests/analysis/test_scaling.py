"""Which (N, D, loss) points a fit uses: D is the tokens seen when the loss was measured."""

import math

import numpy as np

from repeat_lm.analysis import results, scaling


def test_a_fit_pairs_the_final_loss_with_the_tokens_at_that_evaluation():
  stopped = results.Run(run="stopped", status="failed", model_dir=None, params=1e7, tokens_seen=9.8e7,
                        final_eval_tokens=6.5e7, final_eval_loss=2.9, unique_tokens=1e7)
  older = results.Run(run="older", status="finished", model_dir=None, params=1e7, tokens_seen=5e7,
                      final_eval_loss=3.1, unique_tokens=1e7)  # a table from before final_eval_tokens
  unusable = results.Run(run="nan", status="running", model_dir=None, params=1e7, tokens_seen=1e7)
  used, arrays = scaling.fit_data([stopped, older, unusable])
  assert [r.run for r in used] == ["stopped", "older"]
  np.testing.assert_array_equal(arrays["d"], [6.5e7, 5e7])
  np.testing.assert_array_equal(arrays["loss"], [2.9, 3.1])
  # The epoch cut reads the same D: 6.5 epochs at its evaluation, 9.8 at its last train record.
  assert [r.run for r in scaling.fit_data([stopped], max_epochs=7)[0]] == ["stopped"]
  assert math.isnan(results.Run(run="x", status="", model_dir=None).final_eval_tokens)
