"""Every shipped gin file parses against repeat_lm's configurables, and bad gin gives an instruction."""

import re
from pathlib import Path

import gin
import pytest

from repeat_lm import gin_utils

GIN_DIR = Path(__file__).resolve().parents[1] / "gin"
MODEL_GINS = sorted(str(p.relative_to(GIN_DIR.parent)) for p in (GIN_DIR / "models").glob("*.gin"))
# Run gins that include a model themselves parse alone; the others are parsed with a model gin first.
SELF_CONTAINED = ["gin/runs/smoke.gin"]
NEEDS_MODEL = ["gin/runs/pretrain.gin", "gin/runs/eval.gin"]


def _parse(*files):
  gin_utils.parse(list(files), [])
  return gin.config_str()


def test_model_gins_exist():
  assert {"gin/models/t5_1_1_tiny.gin", "gin/models/t5_1_1_base.gin", "gin/models/t5_1_1_xxl.gin"} <= set(MODEL_GINS)


@pytest.mark.parametrize("model_gin", MODEL_GINS)
@pytest.mark.parametrize("run_gin", NEEDS_MODEL)
def test_model_and_run_gins_parse(model_gin, run_gin):
  _parse(model_gin, run_gin)
  assert "gin.REQUIRED" in repr(gin.query_parameter("%MODEL_DIR"))


@pytest.mark.parametrize("run_gin", SELF_CONTAINED)
def test_self_contained_run_gins_parse(run_gin):
  _parse(run_gin)
  assert gin.query_parameter("%TRAIN_STEPS") == 50


def test_bindings_override_files():
  gin_utils.parse(["gin/runs/smoke.gin"], ["TRAIN_STEPS=7", "MODEL_DIR='/tmp/x'"])
  assert gin.query_parameter("%TRAIN_STEPS") == 7
  assert gin.query_parameter("%MODEL_DIR") == "/tmp/x"


@pytest.mark.parametrize("binding", ["TRAIN_STEPS=", "MODEL_DIR=/tmp/unquoted path", "trainer.train.no_such_arg=1",
                                     "t5.T5Config.emb_dim = (("])
def test_malformed_binding_is_a_clear_error(binding):
  with pytest.raises(gin_utils.GinConfigError, match="Could not parse the gin configuration"):
    gin_utils.parse(["gin/runs/smoke.gin"], [binding])


def test_a_misspelt_macro_binding_is_an_error_naming_the_macro():
  # gin accepts a binding of a macro that nothing uses: --gin.BATCH_SIZ=4 trained at the smoke gin's 16.
  with pytest.raises(gin_utils.GinConfigError, match=r"--gin.BATCH_SIZ \(did you mean BATCH_SIZE"):
    gin_utils.parse(["gin/runs/smoke.gin"], ["BATCH_SIZE=8", "BATCH_SIZ=4"])
  with pytest.raises(gin_utils.GinConfigError, match=r"--gin.MODEL_DIR: no gin file uses this macro"):
    gin_utils.parse(["gin/models/t5_1_1_tiny.gin"], ["MODEL_DIR='/tmp/x'"])  # a run setting without a run gin


def test_a_parse_error_names_the_binding_or_file_at_fault(tmp_path):
  # gin numbered the lines of all bindings joined after the prelude ("line 16"), naming none of them.
  with pytest.raises(gin_utils.GinConfigError, match=r"in --gin.MODEL_DIR=/tmp/x:"):
    gin_utils.parse(["gin/runs/smoke.gin"], ["TRAIN_STEPS=3", "MODEL_DIR=/tmp/x", "BATCH_SIZE=4"])
  unclosed = tmp_path / "unclosed.gin"
  unclosed.write_text("t5.T5Config.emb_dim = (64\n")  # a tokenizer error: gin names no file
  with pytest.raises(gin_utils.GinConfigError, match=f"in --gin_file={unclosed}"):
    gin_utils.parse(["gin/models/t5_1_1_tiny.gin", str(unclosed), "gin/runs/pretrain.gin"], [])


def test_a_tokenizer_error_names_the_file_and_line_it_is_in(tmp_path):
  """Python's tokenizer errors carry only a line (TokenError) or no real file (IndentationError of '<tokenize>');
  the file is the one gin was reading, an included file's own rather than the --gin_file that includes it. An
  unclosed bracket is a TokenError on every Python, a malformed number from 3.12 on (3.11: gin's own SyntaxError,
  which names the file too)."""
  cases = {"unclosed.gin": ("# settings\nt5.T5Config.emb_dim = (64\n", "(unexpected )?EOF in multi-line statement", 2),
           "number.gin": ("# settings\nB = 0b2\n", ".*", 2),
           "indent.gin": ("A = 1\n    B = 2\n  C = 3\n", "unindent does not match any outer indentation level", 3)}
  for name, (text, message, line) in cases.items():
    faulty, including = tmp_path / name, tmp_path / f"run_{name}"
    faulty.write_text(text)
    including.write_text(f"include '{faulty}'\n")
    with pytest.raises(gin_utils.GinConfigError,
                       match=rf"in --gin_file={re.escape(str(including))} \(or a file it includes\): {message} "
                             rf"\(({re.escape(str(faulty))}|{name}), line {line}\)"):
      gin_utils.parse(["gin/models/t5_1_1_tiny.gin", str(including)], [])
  # A binding's line is its own, not counted after the prelude gin parses it with (a tokenizer's or gin's error).
  for binding in ("BATCH_SIZE=(4", "BATCH_SIZE='4"):
    with pytest.raises(gin_utils.GinConfigError, match=rf"in --gin.{re.escape(binding)}: .*\(line 1\)"):
      gin_utils.parse(["gin/runs/smoke.gin"], [binding])


def test_missing_gin_file():
  with pytest.raises(gin_utils.GinConfigError, match="not found"):
    gin_utils.parse(["gin/runs/no_such_run.gin"], [])


def test_shipped_gins_parse_outside_the_repository_without_error_lines(tmp_path, monkeypatch, caplog):
  # gin logged an ERROR for each search path it did not find a file under (the current directory comes first), two
  # for every `gin/...` file parsed from another directory; a file found nowhere still fails with the reason.
  monkeypatch.chdir(tmp_path)
  with caplog.at_level("INFO"):
    gin_utils.parse(["gin/runs/smoke.gin"], ["TRAIN_STEPS=3", "MODEL_DIR='/tmp/x'"])
  assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
  (tmp_path / "broken.gin").write_text("include 'gin/models/no_such_model.gin'\n")
  with pytest.raises(gin_utils.GinConfigError, match="no_such_model.gin"):
    gin_utils.parse([str(tmp_path / "broken.gin")], [])


def test_split_gin_args():
  bindings, rest = gin_utils.split_gin_args(
      ["--gin_file=a.gin", "--gin.MODEL_DIR='/x'", "--gin.TRAIN_STEPS", "3", "--log_level=INFO"])
  assert bindings == ["MODEL_DIR='/x'", "TRAIN_STEPS=3"]
  assert rest == ["--gin_file=a.gin", "--log_level=INFO"]


def test_accelerator_overlay_sets_the_measured_step_setting():
  """gin/runs/accelerator.gin after a model and pretrain.gin: unrolled layers + no remat + cuDNN attention (measured
  fastest for T5 v1.1 Base on an H200); the bindings its comment gives for a step that does not fit still win."""
  model = gin_utils.configured_macro(
      ["gin/models/t5_1_1_base.gin", "gin/runs/pretrain.gin", "gin/runs/accelerator.gin"],
      ["MODEL_DIR='/tmp/x'", "TRAIN_STEPS=1", "MIXTURE_OR_TASK_NAME='x'", "TASK_FEATURE_LENGTHS={}"], "MODEL")
  config = model.module.config
  assert (config.scan_layers, config.remat_policy, config.attention_implementation) == (False, "none", "cudnn")
  assert config.dtype == "bfloat16" and config.emb_dim == 768
  model = gin_utils.configured_macro(
      ["gin/models/t5_1_1_base.gin", "gin/runs/pretrain.gin", "gin/runs/accelerator.gin"],
      ["MODEL_DIR='/tmp/x'", "TRAIN_STEPS=1", "MIXTURE_OR_TASK_NAME='x'", "TASK_FEATURE_LENGTHS={}",
       "SCAN_LAYERS=True", "REMAT_POLICY='minimal'"], "MODEL")
  assert (model.module.config.scan_layers, model.module.config.remat_policy) == (True, "minimal")  # the override


def test_readme_c4_gin_snippet_parses(tmp_path):
  # README's "Real C4 and the T5 vocabulary" block, written to a file as it says ("in a gin file, after the run gin").
  readme = (GIN_DIR.parent / "README.md").read_text()
  block = readme.split("# in a gin file, after the run gin\n", 1)[1].split("```", 1)[0]
  snippet = tmp_path / "c4.gin"
  snippet.write_text(block)
  _parse("gin/models/t5_1_1_small.gin", "gin/runs/pretrain.gin", str(snippet))
  assert "repeated_task" in repr(gin.query_parameter("%MIXTURE_OR_TASK_NAME"))
  # A budget and a validation corpus: the train files are streamed only as far as the subset needs (docs/data.md).
  assert gin.query_parameter("tasks.repeated_task.unique_tokens") == 2**35
  assert gin.query_parameter("tasks.repeated_task.validation").startswith("/data/c4/en/c4-validation")


def test_a_macro_used_only_inside_a_list_or_dict_may_be_bound(tmp_path):
  # Such a macro is used (e.g. TASK_FEATURE_LENGTHS = {'inputs': %INPUTS_LENGTH}): its binding changes the value.
  uses = tmp_path / "uses.gin"
  uses.write_text("from __gin__ import dynamic_registration\nfrom repeat_lm import gin_utils\nA = 1\nB = 2\n"
                  "gin_utils.macro_value.value = {'a': %A, 'b': [%B]}\n")
  gin_utils.parse([str(uses)], ["A=3", "B=4"])
  assert gin.configurable(gin_utils.macro_value)() == {"a": 3, "b": [4]}


def test_an_unbound_required_macro_stops_the_call_before_it_runs():
  # gin hands a %gin.REQUIRED macro's sentinel object on, so the configured function would run with it.
  gin_utils.parse(["gin/runs/smoke.gin"], [])
  with pytest.raises(gin_utils.GinConfigError, match=r"Required setting\(s\) not bound: MODEL_DIR"):
    gin_utils.call_configured(gin_utils.macro_value, value="ran")


def test_a_later_file_declaring_a_bound_setting_required_again_is_named_with_the_order_that_works(tmp_path):
  # A sweep run's run.gin then gin/runs/eval.gin: "not bound" of the settings run.gin had bound.
  run = tmp_path / "run.gin"
  run.write_text("include 'gin/runs/smoke.gin'\nMODEL_DIR = '/tmp/run'\n")
  gin_utils.parse([str(run), "gin/runs/eval.gin"], [])
  with pytest.raises(gin_utils.GinConfigError, match=rf"gin/runs/eval.gin declares MIXTURE_OR_TASK_NAME, MODEL_DIR, "
                                                     rf"TASK_FEATURE_LENGTHS required again after {run} bound them "
                                                     rf".*give --gin_file=gin/runs/eval.gin first"):
    gin_utils.check_required()
  gin_utils.parse(["gin/runs/eval.gin", str(run)], [])
  gin_utils.check_required()
  # A third file after them: each macro stays the file's that declared it required again (not the last file's),
  # and each group says "it" or "them" of its own macros.
  steps = tmp_path / "steps.gin"
  steps.write_text("TRAIN_STEPS = %gin.REQUIRED\n")
  gin_utils.parse([str(run), "gin/runs/eval.gin", str(steps)], [])
  with pytest.raises(gin_utils.GinConfigError) as wrong_order:
    gin_utils.check_required()
  assert (f"gin/runs/eval.gin declares MIXTURE_OR_TASK_NAME, MODEL_DIR, TASK_FEATURE_LENGTHS required again after "
          f"{run} bound them" in str(wrong_order.value))
  assert f"{steps} declares TRAIN_STEPS required again after {run} bound it " in str(wrong_order.value)
  # Another configuration parsed since (not by parse) is not described by the last parse's record.
  gin.clear_config()
  gin.parse_config("MODEL_DIR = %gin.REQUIRED")
  with pytest.raises(gin_utils.GinConfigError) as other:
    gin_utils.check_required()
  assert "again" not in str(other.value)
  gin_utils.parse(["gin/runs/smoke.gin"], [])  # bound by no file: no order to suggest
  with pytest.raises(gin_utils.GinConfigError) as unbound:
    gin_utils.check_required()
  assert "again" not in str(unbound.value)


def test_a_missing_gin_file_names_the_search_paths_given(tmp_path):
  with pytest.raises(gin_utils.GinConfigError, match=f"searched {tmp_path}, "):
    gin_utils.parse(["no_such_model.gin"], [], [str(tmp_path)])


def test_an_include_is_read_from_this_parse_s_search_path(tmp_path):
  # gin keeps every search path ever added: the second parse read folder a's inc.gin, not that of its own folder b.
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "inc.gin").write_text(f"X = '{folder}'\n")
  main = tmp_path / "main.gin"
  main.write_text("from __gin__ import dynamic_registration\nfrom repeat_lm import gin_utils\ninclude 'inc.gin'\n"
                  "gin_utils.macro_value.value = %X\n")
  assert gin_utils.configured_macro([str(main)], [], "X", [str(tmp_path / "a")]) == "a"
  assert gin_utils.configured_macro([str(main)], [], "X", [str(tmp_path / "b")]) == "b"


def test_an_unquoted_string_binding_is_shown_quoted():
  # gin's own message for --gin.DROPOUT_SCHEDULE=staged:4 ('malformed node or string ... ast.Name') said no fix.
  with pytest.raises(gin_utils.GinConfigError,
                     match="""For a string, quote it: --gin.DROPOUT_SCHEDULE="'staged:4'"."""):
    gin_utils.parse(["gin/runs/smoke.gin"], ["DROPOUT_SCHEDULE=staged:4"])
  assert gin_utils._quoting_hint("TRAIN_STEPS=-3") == gin_utils._quoting_hint("X=[1]") == ""  # pylint: disable=W0212
  assert gin_utils._quoting_hint("X=True") == gin_utils._quoting_hint("X=@f()") == ""  # pylint: disable=W0212
  # YAML's and JSON's spellings: quoting them would be refused as strings further on.
  assert gin_utils._quoting_hint("X=false") == " Gin spells false as False: --gin.X=False."  # pylint: disable=W0212
