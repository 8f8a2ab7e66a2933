"""The sweep, collect and launch-local commands: one JSON object on success, exit code 2 and the fix on bad input."""

import json

from experiment_helpers import tiny_experiment
from repeat_lm import cli


def test_sweep_dry_run_prints_the_runs(tmp_path, capsys, fresh_gin):
  exp = tiny_experiment(tmp_path / "exp.gin", "[{'name': 'a'}, {'DROPOUT_RATE': 0.1}]")
  root = tmp_path / "root"
  assert cli.main(["sweep", f"--experiment={exp}", f"--root={root}", "--dry-run", "--gin.TRAIN_STEPS=2"]) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)["run_names"] == ["a", "dropout0.1"]
  assert f"repeat-lm train --gin_file={root}/a/run.gin  # pending" in captured.err
  assert "TRAIN_STEPS = 2" in (root / "dropout0.1" / "run.gin").read_text()  # command-line bindings apply to all


def test_bad_input_names_the_fix(tmp_path, capsys, fresh_gin):
  assert cli.main(["sweep", "--experiment=gin/experiments/nope.gin", f"--root={tmp_path}"]) == 2
  assert "not found" in capsys.readouterr().err
  exp = tiny_experiment(tmp_path / "exp.gin", "[{'name': 'a'}]")
  assert cli.main(["sweep", f"--experiment={exp}", f"--root={tmp_path}", "--only=zzz*", "--dry-run"]) == 2
  assert "matches none" in capsys.readouterr().err
  assert cli.main(["sweep", f"--experiment={exp}", f"--root={tmp_path}", "--launcher=tpu-vm", "--submit"]) == 2
  assert "--tpu=NAME" in capsys.readouterr().err
  assert cli.main(["collect", f"--root={tmp_path / 'missing'}"]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["launch-local", "--num_processes=2"]) == 2
  assert "needs a command" in capsys.readouterr().err
