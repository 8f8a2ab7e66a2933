"""A run's metrics.jsonl as the trainer writes it, for the analysis tests."""

import json


def write_curve(model_dir, values, tokens_per_step=100.0, metric="eval/accuracy"):
  """Evaluations of `metric` every 10 steps, train records every 5 (tokens seen only there, as the trainer writes
  them); returns model_dir as a string."""
  model_dir.mkdir(parents=True)
  lines = [{"step": s, "train/loss": 2.0, "train/tokens_seen": s * tokens_per_step}
           for s in range(5, 10 * len(values) + 1, 5)]
  lines += [{"step": 10 * (i + 1), metric: v} for i, v in enumerate(values)]
  (model_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  return str(model_dir)
