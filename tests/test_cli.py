"""The command line: bad input gives exit code 2 and a message that names the problem and the fix."""

import runpy
import sys

import pytest

from repeat_lm import cli, demo, runtime
from repeat_lm.experiments import launch_local


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


def test_an_unknown_log_level_is_a_usage_error(capsys):
  # logging.basicConfig raised ValueError("Unknown level: 'VERBOSE'") as a traceback.
  with pytest.raises(SystemExit) as e:
    cli.main(["--log_level=verbose", "plan", "--unique-tokens=1e9", "--compute=1e20"])
  assert e.value.code == 2 and "invalid choice: 'VERBOSE'" in capsys.readouterr().err
  assert cli.build_parser().parse_args(["--log_level=warning", "collect", "--root=x"]).log_level == "WARNING"


def test_strict_json_nulls_every_non_finite_float():
  # JSON has no NaN or Infinity (RFC 8259): a diverged run's inf loss is null too, inside lists and tuples.
  inf, nan = float("inf"), float("nan")
  assert cli.strict_json({"a": inf, "b": [-inf, 1.5, (nan, 2)], "c": {"d": nan}}) == {
      "a": None, "b": [None, 1.5, [None, 2]], "c": {"d": None}}


def test_demo_gets_its_flags(tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(demo, "run_demo", lambda out, **kw: calls.append((out, kw)))
  assert cli.main(["demo", f"--out={tmp_path}", "--seed=3", "--quick", "--steps=5"]) == 0
  assert calls == [(str(tmp_path), {"seed": 3, "quick": True, "steps": 5})]
  assert cli.main(["demo", f"--out={tmp_path}", "--gin.DROPOUT_RATE=0.1"]) == 2  # its settings are demo.py's
  assert "demo takes no --gin bindings" in capsys.readouterr().err and len(calls) == 1


def test_launch_local_passes_the_command_and_its_bindings(monkeypatch):
  calls = []
  monkeypatch.setattr(launch_local, "launch", lambda *a: calls.append(a) or 0)
  assert cli.main(["launch-local", "--num_processes=3", "--devices_per_process=2", "--port=1234", "--", "train",
                   "--gin_file=gin/runs/smoke.gin", "--gin.TRAIN_STEPS=2"]) == 0
  assert calls == [(["train", "--gin_file=gin/runs/smoke.gin", "--gin.TRAIN_STEPS=2"], 3, 2, 1234)]


@pytest.mark.parametrize("child,code", [(130, 130), (-9, 137), (75, 75), (2, 2)])
def test_launch_local_exits_with_the_status_of_its_failing_process(monkeypatch, capsys, child, code):
  """Every failure exited 2: a wrapper could not tell Ctrl-C (130), an OOM kill (SIGKILL: 137) or a stopped trainer
  (75) from a configuration error. The message still names the command and the child's code."""
  monkeypatch.setattr(launch_local, "launch", lambda *a: child)
  assert cli.main(["launch-local", "--", "train", "--gin_file=gin/runs/smoke.gin"]) == code
  assert f"repeat-lm: error: A process of `repeat-lm train --gin_file=gin/runs/smoke.gin` exited with code {child}" \
      in capsys.readouterr().err


def test_python_m_train_passes_its_arguments_to_train(monkeypatch):
  # `python -m repeat_lm.train ARGS` is `repeat-lm train ARGS`: the module's own path (sys.argv[0]) is no argument.
  calls = []
  monkeypatch.setattr(runtime, "configure_host_allocator", lambda: None)
  monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
  monkeypatch.setattr(sys, "argv", ["/x/repeat_lm/train/__main__.py", "--gin_file=a.gin", "--gin.TRAIN_STEPS=2"])
  with pytest.raises(SystemExit) as e:
    runpy.run_module("repeat_lm.train", run_name="__main__")
  assert e.value.code == 0 and calls == [["train", "--gin_file=a.gin", "--gin.TRAIN_STEPS=2"]]


@pytest.mark.parametrize('split, shuffle', [('train', True), ('validation', False)])
def test_bench_data_reads_each_split_as_training_and_evaluation_do(monkeypatch, split, shuffle):
  # The validation split was timed as a shuffled, unending stream; evaluation reads it once, in order.
  from repeat_lm.bench import data as bench_data
  from repeat_lm.data import tasks
  seen = []
  monkeypatch.setattr(tasks, 'ensure_registered', lambda name: name)
  monkeypatch.setattr(bench_data, 'run_benchmark', lambda cfg, bench: seen.append(cfg) or {})
  cli._main(['bench', 'data', f'--split={split}', '--json'])
  assert seen[0].split == split and seen[0].shuffle is shuffle
