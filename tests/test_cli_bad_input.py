"""Bad input across the commands: a message that names the problem and the fix, and nothing earlier is lost."""

import csv
import errno
import json
import subprocess
import sys

import pytest

from repeat_lm import cli, gin_utils


def test_an_invalid_model_setting_is_not_reported_as_a_missing_model(capsys):
  assert cli.main(["model-info", "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin.DROPOUT_RATE=1.5"]) == 2
  err = capsys.readouterr().err
  assert "do not define MODEL" not in err and "must lie in [0, 1)" in err
  assert cli.main(["model-info", "--gin_file=gin/runs/pretrain.gin"]) == 2
  assert "do not define MODEL" in capsys.readouterr().err


def test_a_misspelt_macro_or_a_bad_dtype_is_an_error_not_ignored_or_a_traceback(capsys):
  tiny = "--gin_file=gin/models/t5_1_1_tiny.gin"
  assert cli.main(["model-info", tiny, "--gin.DROPOUT_RAT=0.1"]) == 2
  assert "did you mean DROPOUT_RATE" in capsys.readouterr().err
  assert cli.main(["model-info", tiny, "--gin.t5.T5Config.dtype='bfloat61'"]) == 2
  assert "dtype='bfloat61' is not a floating-point dtype" in capsys.readouterr().err
  assert cli.main(["model-info", tiny, "--gin.MODEL=@t5.T5Config()"]) == 2  # was AttributeError's traceback
  assert "The gin's MODEL is a T5Config, not a model" in capsys.readouterr().err


def test_a_model_that_is_no_model_is_named_by_export_and_infer(tmp_path, capsys):
  # model-info and bench name it; export hf and infer (their --gin_file) ended in an AttributeError traceback.
  (tmp_path / "in.txt").write_text("hello\n")
  common = [f"--checkpoint={tmp_path}", "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin.MODEL=@t5.T5Config()"]
  for argv in (["export", "hf", f"--out={tmp_path / 'hf'}"], ["infer", f"--input_file={tmp_path / 'in.txt'}"]):
    assert cli.main([*argv, *common]) == 2
    assert "The gin's MODEL is a T5Config, not a model" in capsys.readouterr().err


def test_eval_with_the_pretraining_gin_names_the_eval_gin(tmp_path, capsys):
  code = cli.main(["eval", "--gin_file=gin/runs/smoke.gin", f"--gin.MODEL_DIR='{tmp_path}'"])
  assert code == 2
  assert "gin/runs/eval.gin" in capsys.readouterr().err


def test_an_output_path_of_the_wrong_kind_is_an_error_not_a_traceback(tmp_path, capsys):
  (tmp_path / "a_file").write_text("x")
  code = cli.main(["sweep", "--experiment=gin/experiments/rq1_repetition_cpu.gin", f"--root={tmp_path / 'a_file'}",
                   "--dry-run"])
  assert code == 2
  assert "Not a directory" in capsys.readouterr().err


def test_a_full_disk_is_an_error_not_a_traceback(monkeypatch, capsys):
  def full(*_):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setitem(cli.COMMANDS, "plan", (cli.COMMANDS["plan"][0], full))
  assert cli.main(["plan", "--unique-tokens=1e9", "--compute=1e20"]) == 2
  assert "No space left on device" in capsys.readouterr().err


@pytest.mark.parametrize("error, hint", [
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "out/a_file/x"), "Check the paths"),
    (PermissionError(errno.EACCES, "Permission denied", "/out"), "Check the paths"),
    (OSError(errno.ENOSPC, "No space left on device"), "Free space"),
    (OSError(errno.EIO, "Input/output error"), "Free space"),
    # A read-only file system was told to free space.
    (OSError(errno.EROFS, "Read-only file system", "/ro/metrics.jsonl"), "read-only")])
def test_an_os_error_gets_the_hint_of_its_kind(monkeypatch, capsys, error, hint):
  def fail(*_):
    raise error
  monkeypatch.setitem(cli.COMMANDS, "plan", (cli.COMMANDS["plan"][0], fail))
  assert cli.main(["plan", "--unique-tokens=1e9", "--compute=1e20"]) == 2
  err = capsys.readouterr().err
  other = "Free space" if hint == "Check the paths" else "Check the paths"
  assert hint in err and other not in err


def test_collect_of_a_root_without_runs_keeps_the_results_table(tmp_path, capsys):
  from repeat_lm.experiments import collect
  table = tmp_path / "results.csv"
  collect.write_table([{"run": "a", "status": "finished", "final_eval_loss": 3.0}], table)
  before = table.read_text()
  (tmp_path / "not_a_sweep").mkdir()
  assert cli.main(["collect", f"--root={tmp_path / 'not_a_sweep'}", f"--out={table}"]) == 2
  assert "holds no sweep runs" in capsys.readouterr().err
  assert table.read_text() == before
  assert list(csv.DictReader(table.open()))[0]["run"] == "a"


@pytest.mark.usefixtures("hf_libraries")
def test_a_failed_export_keeps_the_earlier_weights(tmp_path, monkeypatch):
  import numpy as np
  import safetensors.numpy
  from repeat_lm.interop import hf
  hf.write_safetensors({"w": np.ones(3, np.float32)}, tmp_path)
  before = (tmp_path / "model.safetensors").read_bytes()

  def full(*_, **__):
    raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
  monkeypatch.setattr(safetensors.numpy, "save_file", full)
  with pytest.raises(OSError, match="No space left"):
    hf.write_safetensors({"w": np.zeros(5, np.float32)}, tmp_path)
  assert (tmp_path / "model.safetensors").read_bytes() == before


def test_infer_refuses_a_vocabulary_larger_than_the_model():
  from repeat_lm.data import vocab
  from repeat_lm.train import inference
  small = vocab.default_vocabulary()
  inference.check_vocabulary_fits(small, 8192)
  with pytest.raises(ValueError, match="vocab_size is 4096"):
    inference.check_vocabulary_fits(small, 4096)


def test_infer_checks_the_output_file_before_decoding(tmp_path):
  from repeat_lm.train import inference
  with pytest.raises(ValueError, match="is a directory"):
    inference.check_output_file(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    inference.check_output_file(str(tmp_path / "missing" / "out.txt"))
  inference.check_output_file(str(tmp_path / "out.txt"))


def test_infer_refuses_an_output_file_that_is_its_input_or_a_file_of_the_checkpoint(tmp_path):
  """It decoded and then wrote over them: the inputs replaced by outputs, MODEL_DIR/config.gin (so the run no longer
  loads) or metrics.jsonl lost."""
  from repeat_lm.train import inference
  model_dir, inputs = tmp_path / "run", tmp_path / "in.txt"
  (model_dir / "checkpoints" / "4").mkdir(parents=True)
  for name in ("config.gin", "metrics.jsonl", "checkpoints/4/commit_success.txt", "outputs.txt"):
    (model_dir / name).write_text("kept")
  inputs.write_text("a\n")
  with pytest.raises(ValueError, match="is the --input_file"):
    inference.check_output_file(str(inputs), str(inputs), str(model_dir))
  for name, match in (("config.gin", "is a file of the checkpoint"), ("metrics.jsonl", "is a file of the checkpoint"),
                      ("checkpoints/4/commit_success.txt", "is inside the checkpoints of")):
    with pytest.raises(ValueError, match=match):
      inference.check_output_file(str(model_dir / name), str(inputs), str(model_dir))
  inference.check_output_file(str(model_dir / "outputs.txt"), str(inputs), str(model_dir))  # an earlier output
  inference.check_output_file(str(model_dir / "new.jsonl"), str(inputs), str(model_dir))  # a new file
  # --checkpoint naming one step (or checkpoints/): the MODEL_DIR around it is the run's, config.gin was overwritten.
  for checkpoint in (model_dir / "checkpoints" / "4", model_dir / "checkpoints"):
    for name in ("config.gin", "metrics.jsonl"):
      with pytest.raises(ValueError, match=f"is a file of the checkpoint .* e.g. {model_dir / 'outputs.txt'}"):
        inference.check_output_file(str(model_dir / name), str(inputs), str(checkpoint))
    inference.check_output_file(str(model_dir / "outputs.txt"), str(inputs), str(checkpoint))


def test_a_missing_vocabulary_file_names_the_infer_flag(tmp_path):
  from repeat_lm.train import inference
  with pytest.raises(FileNotFoundError, match=r"--vocabulary=.*nowhere\.model: no such file"):
    inference.vocabulary_of(None, str(tmp_path / "nowhere.model"))


def test_infer_reads_one_input_per_newline(tmp_path):
  r"""Form feeds, U+2028, \x1d and a stray \r inside a line do not split it: one output per line of the file."""
  from repeat_lm.train import inference
  path = tmp_path / "in.txt"
  path.write_bytes("first\r\nsecond\x0cpage two\nthird \u2028 sep\nfourth\x1dgroup\rend\n\nlast".encode("utf-8"))
  assert inference.read_lines(str(path)) == ["first", "second\x0cpage two", "third \u2028 sep", "fourth\x1dgroup\rend",
                                             "", "last"]
  path.write_text("a\nb\n", encoding="utf-8")
  assert inference.read_lines(str(path)) == ["a", "b"]
  path.write_text("", encoding="utf-8")
  assert inference.read_lines(str(path)) == []


def test_bench_accelerator_out_never_overwrites_results(tmp_path, capsys):
  """--out=X.json wrote the results to X.json, then the Markdown report over them (with --from_json=X.json, the only
  copy); --out=docs/performance.md replaced `bench report`'s history of every host, docs/performance.json."""
  measured = tmp_path / "acc.json"
  measured.write_text('{"date": "d", "model_gin": "g", "steps": 1, "rounds": 1, "versions": {}, "results": []}')
  history = tmp_path / "performance.json"
  history.write_text('{"hosts": {"cpu": {"date": "d", "train": []}}}')
  before = measured.read_text(), history.read_text()
  assert cli.main(["bench", "accelerator", f"--from_json={measured}", f"--out={measured}"]) == 2
  assert "its results are written to" in capsys.readouterr().err
  assert cli.main(["bench", "accelerator", f"--from_json={measured}", f"--out={tmp_path / 'performance.md'}"]) == 2
  assert "is not a `bench accelerator` JSON" in capsys.readouterr().err
  assert (measured.read_text(), history.read_text()) == before
  assert cli.main(["bench", "accelerator", f"--from_json={measured}", f"--out={tmp_path / 'acc.md'}"]) == 0
  assert (tmp_path / "acc.md").read_text().startswith("# Performance on an accelerator")


def test_a_non_utf8_gin_is_named_with_its_file(tmp_path, capsys):
  # A bare "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff" named neither the file nor the fix.
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.gin").write_bytes(b"\xff\xfeM\x00")
  (tmp_path / "in.txt").write_text("a\n")
  assert cli.main(["infer", f"--checkpoint={tmp_path / 'run'}", f"--input_file={tmp_path / 'in.txt'}"]) == 2
  assert f"{tmp_path / 'run' / 'config.gin'} is not UTF-8 text" in capsys.readouterr().err
  assert cli.main(["sweep", f"--experiment={tmp_path / 'run' / 'config.gin'}", f"--root={tmp_path / 'sweep'}",
                   "--dry-run"]) == 2
  assert "config.gin' is not UTF-8 text" in capsys.readouterr().err


def test_infer_and_export_read_includes_on_the_gin_search_path(tmp_path, capsys):
  """--gin_search_path (which both commands accept) was ignored: a --gin_file including a file from that directory
  failed with 'Unable to open file' when run from anywhere else."""
  (tmp_path / "inc").mkdir()
  (tmp_path / "inc" / "my_model.gin").write_text(f"include '{cli.__file__.rsplit('/', 2)[0]}/gin/models/"
                                                  "t5_1_1_tiny.gin'\n")
  (tmp_path / "mine.gin").write_text("include 'my_model.gin'\n")
  (tmp_path / "in.txt").write_text("a\n")
  common = [f"--checkpoint={tmp_path / 'run'}", f"--gin_file={tmp_path / 'mine.gin'}",
            f"--gin_search_path={tmp_path / 'inc'}"]
  # Past the gin: infer stops at the missing vocabulary, export at the missing checkpoint.
  assert cli.main(["infer", *common, f"--input_file={tmp_path / 'in.txt'}"]) == 2
  assert "names no MIXTURE_OR_TASK_NAME" in capsys.readouterr().err
  assert cli.main(["export", "hf", *common, f"--out={tmp_path / 'hf'}"]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_metrics_lines_that_are_no_trainer_records_neither_crash_collect_nor_analyze(tmp_path, capsys):
  """A null value (as strict-JSON tools write NaN), a record without a step, a non-object line and corrupt bytes:
  collect ended in a KeyError / TypeError traceback or a UnicodeDecodeError naming no file, analyze likewise."""
  root = tmp_path / "sweep"
  for name, rate in (("a", 0.1), ("b", 0.2)):
    (root / name).mkdir(parents=True)
    (root / name / "status.json").write_text(json.dumps({"status": "done", "values": {"DROPOUT_RATE": rate}}))
    good = [{"step": 10, "train/loss": 2.0, "train/tokens_seen": 100}, {"step": 10, "eval/loss": 3.0,
                                                                       "eval/accuracy": 0.25}]
    (root / name / "metrics.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in good).encode()
                                                + b'{"step": 20, "eval/loss": null, "eval/accuracy": null}\n'
                                                + b'{"eval/loss": 1.0}\n3\n\xff\xfe\n{"step": "x", "train/loss": 1}\n')
  assert cli.main(["collect", f"--root={root}"]) == 0
  capsys.readouterr()
  with (root / "results.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["best_eval_loss"], r["best_eval_accuracy"], r["final_step"]) for r in rows] == \
      [("a", "3.0", "0.25", "10"), ("b", "3.0", "0.25", "10")]
  assert cli.main(["analyze", "degradation", f"--results={root / 'results.csv'}", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert sorted(r["run"] for r in out["runs"]) == ["a", "b"]


def test_run_status_records_a_failure_whose_log_cannot_be_read(tmp_path, capsys):
  """--log naming a directory ended in IsADirectoryError and left the run `running`: its exit was never recorded."""
  run = tmp_path / "run"
  run.mkdir()
  (run / "run.gin").write_text("TRAIN_STEPS = 2\n")  # a run the sweep wrote
  (run / "status.json").write_text(json.dumps({"status": "running"}))
  assert cli.main(["run-status", f"--run_dir={run}", "--exit_code=1", f"--log={tmp_path}"]) == 0
  assert "IsADirectoryError" in json.loads(capsys.readouterr().out)["error"]
  assert json.loads((run / "status.json").read_text())["status"] == "failed"


def test_collect_of_a_file_says_it_is_no_sweep_root(tmp_path, capsys):
  (tmp_path / "results.csv").write_text("run\n")
  assert cli.main(["collect", f"--root={tmp_path / 'results.csv'}"]) == 2
  err = capsys.readouterr().err
  assert "is a file, not a directory" in err and "does not exist" not in err


def test_a_reader_that_leaves_early_ends_the_command_quietly():
  """`repeat-lm ... | head` said "BrokenPipeError ... Free space, or write the output elsewhere": no disk was full."""
  p = subprocess.Popen([sys.executable, "-m", "repeat_lm.cli", "plan", "--unique-tokens=1e8", "--compute=1e20"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  p.stdout.close()  # the reader is gone before the first line
  err = p.stderr.read().decode()
  assert p.wait() == 128 + 13 and err == ""


@pytest.mark.parametrize("command", [["analyze", "fit", "--results=x.csv"], ["infer", "--input_file=x.txt"]])
def test_a_negative_seed_names_the_flag(command, capsys):
  """NumPy's generators said "expected non-negative integer", naming no flag."""
  with pytest.raises(SystemExit):
    cli.main([*command, "--seed=-1"])
  assert "argument --seed: -1 is negative; give a seed >= 0" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_created_is_named_with_a_hint(capsys):
  """The operating system's FileNotFoundError (/proc allows no new folder) was printed without saying what to do."""
  assert cli.main(["plan", "--unique-tokens=1e8", "--compute=1e20", "--out=/proc/forbidden/x"]) == 2
  err = capsys.readouterr().err
  assert "'/proc/forbidden'. Check the path: an input must exist, and an output's folder must be one" in err


def test_bench_flags_that_cannot_work_fail_before_anything_is_measured(tmp_path, capsys, monkeypatch):
  """--profile_dir was created after the timed rounds (an unwritable one lost their numbers), --profile_xplane read
  after every accelerator variant, and --compile_only ignored --compare and --profile_dir."""
  from repeat_lm.bench import accelerator
  from repeat_lm.bench import train as bench_train
  for name in ("run_benchmark", "compile_only"):
    monkeypatch.setattr(bench_train, name, lambda *a, **k: pytest.fail("measured before the flags were checked"))
  monkeypatch.setattr(accelerator, "measure", lambda *a, **k: pytest.fail("measured before the flags were checked"))
  tiny = "--gin_file=gin/models/t5_1_1_tiny.gin"
  assert cli.main(["bench", "train", tiny, "--profile_dir=/proc/forbidden/x"]) == 2
  assert "'/proc/forbidden'" in capsys.readouterr().err
  assert cli.main(["bench", "train", tiny, "--compile_only", "--compare=hf", f"--profile_dir={tmp_path}"]) == 2
  assert "--compile_only measures compilation alone: leave out --compare and --profile_dir" in capsys.readouterr().err
  assert cli.main(["bench", "accelerator", f"--out={tmp_path / 'a.md'}", f"--profile_xplane={tmp_path / 'no.pb'}"]) == 2
  assert "no.pb: no such file; pass the trace a profiled run wrote" in capsys.readouterr().err
