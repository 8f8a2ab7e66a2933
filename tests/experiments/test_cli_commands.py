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


def test_run_status_records_only_an_unfinished_run_the_sweep_wrote(tmp_path, capsys):
  """A typo'd --run_dir recorded the attempt in a new directory (the real run was never updated); a stray job flipped
  a finished run to failed; --exit_code=99999999999999999999 was recorded as the run's return code."""
  missing = tmp_path / "no" / "such" / "run"
  assert cli.main(["run-status", f"--run_dir={missing}", "--started"]) == 2
  assert "does not exist: --run_dir must be a run directory" in capsys.readouterr().err
  assert not (tmp_path / "no").exists()
  (tmp_path / "ok.gin").write_text("TRAIN_STEPS = 2\n")
  assert cli.main(["run-status", f"--run_dir={tmp_path / 'ok.gin'}", "--exit_code=1"]) == 2
  assert "is a file, not a run directory" in capsys.readouterr().err

  run = tmp_path / "fin"
  (run / "checkpoints" / "2").mkdir(parents=True)
  (run / "run.gin").write_text("TRAIN_STEPS = 2\n")
  (run / "status.json").write_text('{"status": "running"}')
  assert cli.main(["run-status", f"--run_dir={run}", "--exit_code=99999999999999999999"]) == 2
  assert "is no exit status" in capsys.readouterr().err
  # The job that trained the last step records its exit: the run is complete before it is recorded finished.
  assert cli.main(["run-status", f"--run_dir={run}", "--exit_code=0"]) == 0
  assert json.loads(capsys.readouterr().out)["status"] == "finished"
  before = (run / "status.json").read_text()
  for flag in ("--exit_code=1", "--started"):
    assert cli.main(["run-status", f"--run_dir={run}", flag]) == 2
    assert "is finished (its last checkpoint is there): not recording another attempt" in capsys.readouterr().err
  assert (run / "status.json").read_text() == before
  # A requeued job of the finished run trains nothing and exits 0: the same record, not a refusal (its sbatch script
  # would then exit 75 and fail the fine-tuning jobs chained on it).
  assert cli.main(["run-status", f"--run_dir={run}", "--exit_code=0"]) == 0
  assert json.loads(capsys.readouterr().out)["status"] == "finished"


def test_an_unknown_experiment_is_answered_with_the_shipped_ones(tmp_path, capsys, fresh_gin):
  """A research question named without its folder and suffix, or misspelt, got one example (rq1's) to go on."""
  assert cli.main(["sweep", "--experiment=rq5_objectives_cpu", f"--root={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert "did you mean --experiment=gin/experiments/rq5_objectives_cpu.gin?" in err
  assert "gin/experiments/ holds rq1_repetition.gin, rq1_repetition_cpu.gin, rq2_factors.gin" in err
  assert cli.main(["sweep", "--experiment=gin/experiments/rq3_regularization.gin", f"--root={tmp_path}"]) == 2
  assert "did you mean --experiment=gin/experiments/rq3_regularisation.gin?" in capsys.readouterr().err
  assert cli.main(["sweep", "--experiment=rq6", f"--root={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert "not found" in err and "did you mean" not in err and "rq5_objectives_cpu.gin." in err


def test_a_dry_run_whose_runs_do_not_compose_fails_and_says_why(tmp_path, capsys, fresh_gin):
  """A dry run is how an experiment is checked before it is queued: one whose runs' gins did not compose exited 0, and
  its lines said '# failed' without the reason."""
  exp = tiny_experiment(tmp_path / "exp.gin", "[{'name': 'a'}, {'name': 'typo', 't5.T5Config.emb_dimm': 3}]")
  root = tmp_path / "root"
  assert cli.main(["sweep", f"--experiment={exp}", f"--root={root}", "--dry-run"]) == 2
  captured = capsys.readouterr()
  assert "typo/run.gin  # failed: could not compose its gin" in captured.err and "named 'emb_dimm'" in captured.err
  assert "1 run(s) could not be composed: typo: could not compose its gin" in captured.err
  assert json.loads(captured.out)["uncomposed"].keys() == {"typo"} and (root / "a" / "run.gin").is_file()
  exp = tiny_experiment(tmp_path / "exp.gin", "[{'name': 'a'}, {'name': 'typo', 't5.T5Config.emb_dim': 3}]")
  assert cli.main(["sweep", f"--experiment={exp}", f"--root={root}", "--dry-run"]) == 0  # fixed: composes again
