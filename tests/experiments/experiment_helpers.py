"""The tiny training configuration the sweep and launcher tests run for real (a few seconds of compute per run)."""

# The tiny T5 of the trainer tests (emb 32, 2+2 layers) on the default local corpus: 3 steps of 8 rows of 32/8
# tokens, one evaluation batch at the end.
TINY_BINDINGS = [
    "TRAIN_STEPS=3", "MIXTURE_OR_TASK_NAME='repeat_lm.wiki_span_corruption'",
    "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "BATCH_SIZE=8", "EVAL_BATCH_SIZE=8",
    "t5.T5Config.emb_dim=32", "t5.T5Config.num_heads=2", "t5.T5Config.mlp_dim=64",
    "trainer.train.log_period=1", "trainer.train.eval_steps=1", "optim.make_schedule.warmup_steps=2",
]


def tiny_experiment(path, arms: str, finetune: str = "") -> str:
  """An experiment gin at `path`: the tiny settings above, SWEEP = one grid with `arms` (gin text)."""
  settings = "\n".join(b.replace("=", " = ", 1) for b in TINY_BINDINGS)
  path.write_text(f"""# A test sweep.
from __gin__ import dynamic_registration
from repeat_lm.experiments import sweep
from repeat_lm.models import t5
from repeat_lm.train import optim
from repeat_lm.train import trainer
include 'gin/models/t5_1_1_tiny.gin'
include 'gin/runs/pretrain.gin'
{settings}
SWEEP = @sweep.Grid()
sweep.Grid.arms = {arms}
{finetune}
""")
  return str(path)


def write_squad(directory):
  """A SQuAD-format fixture (train.jsonl, validation.jsonl): every answer a span of its context."""
  import json  # noqa: PLC0415
  directory.mkdir(parents=True, exist_ok=True)
  capitals = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Norway", "Oslo")]
  for split, rows in (("train", capitals * 2), ("validation", capitals)):
    with (directory / f"{split}.jsonl").open("w") as f:
      for i, (country, city) in enumerate(rows):
        f.write(json.dumps({"id": f"{split}-{i}", "question": f"What is the capital of {country}?",
                            "context": f"The capital of {country} is {city}.", "answers": [city]}) + "\n")
  return directory
