"""The grid language of experiment gins: expansion, run names, rendering, selection."""

import pytest

from repeat_lm.experiments import sweep

TASKS = ["repeat_lm.c4.t5.span.d27.e8", "repeat_lm.c4.t5.span.d35.e0"]


def names(grid):
  return [r.name for r in sweep.expand(grid)]


def test_product_names_runs_by_their_varied_values():
  grid = sweep.Grid(axes={"MIXTURE_OR_TASK_NAME": TASKS, "DROPOUT_RATE": [0.0, 0.1]})
  runs = sweep.expand(grid)
  assert [r.name for r in runs] == ["d27_e8_dropout0", "d27_e8_dropout0.1", "d35_e0_dropout0", "d35_e0_dropout0.1"]
  assert runs[1].bindings == (("MIXTURE_OR_TASK_NAME", TASKS[0]), ("DROPOUT_RATE", 0.1))


def test_zip_pairs_values_and_checks_lengths():
  grid = sweep.Grid(axes={"MIXTURE_OR_TASK_NAME": TASKS, "TRAIN_STEPS": [10, 20]}, mode="zip")
  assert names(grid) == ["d27_e8_train_steps10", "d35_e0_train_steps20"]
  with pytest.raises(ValueError, match="equal length"):
    sweep.expand(sweep.Grid(axes={"A": [1, 2], "B": [1]}, mode="zip"))
  with pytest.raises(ValueError, match="product' or 'zip"):
    sweep.expand(sweep.Grid(axes={"A": [1]}, mode="cartesian"))


def test_arms_swap_models_and_combine_with_axes():
  grid = sweep.Grid(arms=[{"model": "gin/models/t5_1_1_base.gin"}, {"model": "gin/models/t5_1_1_large.gin"}],
                    axes={"MIXTURE_OR_TASK_NAME": TASKS}, prefix="rq2")
  runs = sweep.expand(grid)
  assert [r.name for r in runs] == ["rq2_base_d27_e8", "rq2_base_d35_e0", "rq2_large_d27_e8", "rq2_large_d35_e0"]
  assert runs[2].model == "gin/models/t5_1_1_large.gin" and ("model", runs[2].model) not in runs[2].bindings


def test_arm_names_and_lone_values():
  grid = sweep.Grid(arms=[{"name": "none"}, {"DROPOUT_RATE": 0.1}, {"LABEL_SMOOTHING": 0.1},
                          {"DROPOUT_SCHEDULE": "staged:4ep"}, {"WEIGHT_DECAY": 1e-05}],
                    labels={"LABEL_SMOOTHING": "ls"})
  assert names(grid) == ["none", "dropout0.1", "ls0.1", "dropout_schedule_staged_4ep", "weight_decay1e-05"]


def test_duplicate_names_are_an_error():
  grid = sweep.Grid(arms=[{"name": "a"}, {"name": "a", "DROPOUT_RATE": 0.1}])
  with pytest.raises(ValueError, match="not unique"):
    sweep.expand_all([grid])
  with pytest.raises(ValueError, match="sweep.Grid"):
    sweep.expand_all(["not a grid"])


def test_fine_tuning_stages_of_one_name_are_an_error():
  # Both would train into ROOT/RUN/ft_squad: the second stage's bindings would never run.
  grid = sweep.Grid(finetune=[sweep.Finetune("squad", {"LEARNING_RATE": 1e-3}),
                              sweep.Finetune("squad", {"LEARNING_RATE": 1e-4})])
  with pytest.raises(ValueError, match="Finetune names .* not unique"):
    sweep.expand_all([grid])


def test_an_axis_without_values_is_an_error():
  with pytest.raises(ValueError, match=r"axes \['X'\] have no values"):
    sweep.expand(sweep.Grid(axes={"X": [], "Y": [1, 2]}))


def test_best_values_are_labelled_and_render_their_default():
  best = sweep.Best(runs="moe_*", column="DROPOUT_RATE", default=0.2)
  [run] = sweep.expand(sweep.Grid(axes={"DROPOUT_RATE": [best]}, prefix="xl"))
  assert run.name == "xl_dropoutbest" and run.best == {"DROPOUT_RATE": best}
  assert sweep.render(best) == "0.2"


def test_render_writes_gin_values():
  assert sweep.render("@tasks.repeated_task()") == "@tasks.repeated_task()"
  assert sweep.render("%MODEL_DIR") == "%MODEL_DIR"
  assert sweep.render("repeat_lm.c4.t5.span.d27.e8") == "'repeat_lm.c4.t5.span.d27.e8'"
  assert sweep.render({"inputs": 512, "targets": 114}) == "{'inputs': 512, 'targets': 114}"
  assert sweep.render([1e-05, None, True, ("gelu",)]) == "[1e-05, None, True, ('gelu',)]"


def test_select_by_globs():
  runs = sweep.expand(sweep.Grid(axes={"MIXTURE_OR_TASK_NAME": TASKS, "DROPOUT_RATE": [0.0, 0.1]}))
  assert [r.name for r in sweep.select(runs, "d35_*,d27_e8_dropout0")] == [
      "d27_e8_dropout0", "d35_e0_dropout0", "d35_e0_dropout0.1"]
  assert sweep.select(runs, None) == runs


def test_a_best_that_could_never_resolve_is_an_error():
  """A direction other than 'max' / 'min' would pick the worst run; a glob over no run, or over the run that waits
  for the value, would keep that run waiting on every sweep."""
  with pytest.raises(ValueError, match="mode must be 'max'.*got 'Max'"):
    sweep.Best(runs="moe_*", column="DROPOUT_RATE", mode="Max")
  moe = sweep.Grid(axes={"DROPOUT_RATE": [0.1, 0.2]}, prefix="moe")
  typo = sweep.Grid(axes={"DROPOUT_RATE": [sweep.Best(runs="mo_*", column="DROPOUT_RATE")]}, prefix="dense")
  with pytest.raises(ValueError, match=r"dense_dropoutbest: DROPOUT_RATE = sweep.Best\(runs='mo_\*'\) matches none"):
    sweep.expand_all([moe, typo])
  itself = sweep.Grid(axes={"DROPOUT_RATE": [sweep.Best(runs="*dropout*", column="DROPOUT_RATE")]}, prefix="dense")
  with pytest.raises(ValueError, match="matches its own run"):
    sweep.expand_all([moe, itself])
  ok = sweep.Grid(axes={"DROPOUT_RATE": [sweep.Best(runs="moe_*", column="DROPOUT_RATE")]}, prefix="dense")
  assert [r.name for r in sweep.expand_all([moe, ok])] == ["moe_dropout0.1", "moe_dropout0.2", "dense_dropoutbest"]


def test_common_trailing_tokens_are_dropped_from_string_labels():
  # Both tasks end in '.v2': only the token that differs names them.
  grid = sweep.Grid(axes={"MIXTURE_OR_TASK_NAME": ["c4.d27.v2", "c4.d35.v2"]})
  assert names(grid) == ["d27", "d35"]


def test_a_string_that_is_all_common_tokens_keeps_its_whole_name():
  # 'c4.span' is a prefix of 'c4.span.e8': with the common tokens dropped it would be named '' (i.e. not at all).
  assert sweep.label("MIXTURE_OR_TASK_NAME", "c4.span", ["c4.span", "c4.span.e8"]) == "c4_span"
  assert sweep.label("MIXTURE_OR_TASK_NAME", "c4.span.e8", ["c4.span", "c4.span.e8"]) == "e8"


def test_a_lone_model_names_itself_and_a_model_axis_sets_the_runs_model():
  [run] = sweep.expand(sweep.Grid(arms=[{"model": "gin/models/t5_1_1_large.gin"}]))
  assert run.name == "t5_1_1_large" and run.model == "gin/models/t5_1_1_large.gin"  # not "model_t5_1_1_large"
  runs = sweep.expand(sweep.Grid(arms=[{"model": "gin/models/t5_1_1_base.gin"}],
                                 axes={"model": ["gin/models/switch_tiny.gin", "gin/models/t5_tiny.gin"]}))
  assert [r.model for r in runs] == ["gin/models/switch_tiny.gin", "gin/models/t5_tiny.gin"]


def test_the_more_specific_binding_comes_last_so_it_wins_in_gin():
  # Gin keeps the last binding of a key: an arm overrides the grid's fixed bindings, an axis overrides both.
  [run] = sweep.expand(sweep.Grid(bindings={"A": 1, "B": 1}, arms=[{"A": 2, "B": 2}], axes={"B": [3]}))
  assert [v for k, v in run.bindings if k == "A"][-1] == 2 and [v for k, v in run.bindings if k == "B"][-1] == 3


def test_labels_of_bools_none_and_lists():
  assert sweep.label("SCAN_LAYERS", True, [True, False]) == "scan_layerstrue"
  assert sweep.label("X", None, [None, 1]) == "xnone"
  assert sweep.label("MODEL_PARALLEL", [2, 4], [[2, 4]]) == "model_parallel2-4"


def test_render_an_empty_tuple_as_gin_parses_it():
  # `()` is the empty tuple; `(,)` is a syntax error in gin and in Python.
  assert sweep.render(()) == "()" and sweep.render(("a",)) == "('a',)"


def test_run_names_do_not_start_or_end_with_a_separator():
  assert sweep.sanitize("_moe base_") == "moe-base"


def test_select_ignores_spaces_around_globs():
  runs = sweep.expand(sweep.Grid(axes={"MIXTURE_OR_TASK_NAME": TASKS}))
  assert [r.name for r in sweep.select(runs, "d27_e8, d35_e0")] == ["d27_e8", "d35_e0"]


def test_a_glob_of_only_that_matches_no_run_is_refused_beside_one_that_does():
  # 'span_d13_e5,ul2_d13_e6' (a typo in the second) trained the first alone, without a word.
  runs = sweep.expand(sweep.Grid(axes={"MIXTURE_OR_TASK_NAME": TASKS}))
  with pytest.raises(ValueError, match=r"--only='d27_e8,d99\*': 'd99\*' matches none of the \d+ runs: \["):
    sweep.check_only(runs, "d27_e8,d99*")
  sweep.check_only(runs, "d27_e8, d35_*")
  sweep.check_only(runs, None)


def test_a_best_renders_its_default_as_any_other_value():
  assert sweep.render(sweep.Best(runs="moe_*", column="ACTIVATION", default="%GELU")) == "%GELU"  # a reference


def test_a_configurable_parameter_is_labelled_by_its_last_name():
  # 'moe.MoeConfig.dropout_rate' names a run 'dropout0.1', as the DROPOUT_RATE macro does.
  assert sweep.label("moe.MoeConfig.dropout_rate", 0.1, [0.0, 0.1]) == "dropout0.1"
  assert sweep.label("t5.T5Config.num_layers", 4, [2, 4]) == "num_layers4"


def test_a_run_named_dot_or_dot_dot_is_an_error():
  # ROOT/. is ROOT and ROOT/.. its parent: the run's run.gin, status.json and checkpoints landed there (over another
  # run's, maybe), and collect, which lists ROOT's sub-directories, never showed it.
  for arms, prefix in (([{"name": ".."}, {"name": "b"}], ""), ([{"name": "."}], ""), (({},), "..")):
    with pytest.raises(ValueError, match=r"arm .* names its run '\.\.?', which is not a directory name under ROOT: "
                       r"give the arm another 'name'"):
      sweep.expand_all([sweep.Grid(arms=arms, prefix=prefix)])
  assert names(sweep.Grid(arms=[{"name": "..a"}], prefix="")) == ["..a"]  # a name of its own, under ROOT


def test_an_axis_that_is_no_list_is_an_error_that_says_to_give_one():
  # {'DROPOUT_RATE': 0.1} ended in a TypeError traceback (float has no len()); a string would have been one run per
  # character.
  with pytest.raises(ValueError, match=r"axes \['DROPOUT_RATE'\] are not lists: give each axis a list of values, "
                     r"e.g. \{'DROPOUT_RATE': \[0.1\]\}"):
    sweep.expand(sweep.Grid(axes={"DROPOUT_RATE": 0.1, "LABEL_SMOOTHING": [0.0]}))
  with pytest.raises(ValueError, match=r"axes \['MIXTURE_OR_TASK_NAME'\] are not lists"):
    sweep.expand(sweep.Grid(axes={"MIXTURE_OR_TASK_NAME": TASKS[0]}))
  assert names(sweep.Grid(axes={"DROPOUT_RATE": (0.0, 0.1)})) == ["dropout0", "dropout0.1"]  # a tuple is a list


@pytest.mark.parametrize("name", ["squad/v1", "", "a\\b"])
def test_a_fine_tuning_stage_name_that_is_no_folder_name_is_an_error(name):
  """A stage trains into ROOT/RUN/ft_<name>: 'squad/v1' ended the sweep with a StopIteration traceback (the stage's
  folder ft_squad/v1 could not be told back from its name)."""
  with pytest.raises(ValueError, match=r"sweep.Finetune.name must be a non-empty folder name without '/'"):
    sweep.Finetune(name=name)
  assert sweep.Finetune(name="squad_v1").name == "squad_v1"
