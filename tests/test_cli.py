"""The command line: bad input gives exit code 2 and a message that names the problem and the fix."""

import pytest

from repeat_lm import cli


def test_missing_required_macro(capsys):
  assert cli.main(["train", "--gin_file=gin/runs/smoke.gin"]) == 2
  err = capsys.readouterr().err
  assert "MODEL_DIR" in err and "--gin.MODEL_DIR" in err


def test_malformed_binding(capsys):
  assert cli.main(["train", "--gin_file=gin/runs/smoke.gin", "--gin.MODEL_DIR=/tmp/not quoted"]) == 2
  assert "string values need inner quotes" in capsys.readouterr().err


def test_binding_without_value(capsys):
  assert cli.main(["train", "--gin_file=gin/runs/smoke.gin", "--gin.MODEL_DIR"]) == 2
  assert "has no value" in capsys.readouterr().err


def test_missing_corpus(tmp_path, capsys):
  missing = tmp_path / "nowhere" / "c4-train.json.gz"
  code = cli.main(["train", "--gin_file=gin/runs/smoke.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                   "--gin.MIXTURE_OR_TASK_NAME=@tasks.span_corruption_task()",
                   f"--gin.tasks.span_corruption_task.corpus='{missing}'"])
  assert code == 2
  err = capsys.readouterr().err
  assert str(missing) in err


def test_help_lists_commands(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  out = capsys.readouterr().out
  assert "train" in out and "eval" in out
