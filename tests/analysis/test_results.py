"""Reading the results table and the runs' curves."""

import csv
import json
import math

import numpy as np
import pytest

from repeat_lm.analysis import results
from repeat_lm.experiments import collect


def test_read_table(results_csv):
  runs = results.read_results(results_csv)
  assert len(runs) == 25
  r = runs[0]
  assert r.run == "dense_n1e+07_u1048576_s50" and r.params == 1e7 and r.unique_tokens == 2 ** 20
  assert r.model_dir == str(results_csv.parent / "runs" / r.run)  # relative to the CSV's folder
  assert r.get("DROPOUT_RATE") == 0.0 and r.get("model") == "dense" and r.get("missing") is None
  assert results.varied_factors(runs) == ["params", "unique_tokens", "epochs", "model", "DROPOUT_RATE"]


def test_select(results_csv):
  runs = results.read_results(results_csv)
  assert [r.run for r in results.select(runs, "moe_*")] == [f"moe_d{x}" for x in (0.1, 0.2, 0.3, 0.4, 0.5)]
  assert [r.run for r in results.select(runs, "model=dense_xl,DROPOUT_RATE=0.3")] == ["densexl_d0.3"]
  assert len(results.select(runs, "model=dense*")) == 20
  assert results.select(runs, "nope=1") == []
  # A name glob among column conditions (or a condition without its column) is neither form: named, not unpacked.
  for spec, part in (("model=moe,a*", "'a\\*'"), ("=0.3", "''")):
    with pytest.raises(ValueError, match=f"{part} is not COLUMN=VALUE.*one glob on the run name"):
      results.select(runs, spec)


def test_curve_tokens_interpolated(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  records = [{"step": 10, "train/tokens_seen": 1000.0}, {"step": 10, "eval/loss": 3.0},
             {"step": 20, "train/tokens_seen": 2000.0}, {"step": 15, "eval/loss": 2.5},
             {"step": 30, "eval/loss": "nan"}]
  (model_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  run = results.Run(run="r", status="done", model_dir=str(model_dir))
  c = results.load_curve(run, "eval/loss")
  np.testing.assert_array_equal(c.step, [10, 15, 30])
  np.testing.assert_allclose(c.tokens_seen, [1000, 1500, 3000])  # interpolated; past the end at the last rate
  assert c.value[1] == 2.5 and math.isnan(c.value[2])
  assert results.load_curve(run, "eval/accuracy") is None
  assert results.load_curve(results.Run(run="x", status="", model_dir=None), "eval/loss") is None


def test_a_curve_skips_a_line_cut_by_a_crash(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/loss": 3.0}) + "\n\n"
                                           + '{"step": 20, "eval/lo')
  c = results.load_curve(results.Run(run="r", status="running", model_dir=str(model_dir)), "eval/loss")
  np.testing.assert_array_equal(c.step, [10])


def test_bad_table(tmp_path):
  (tmp_path / "a.csv").write_text("name,params\nx,1\n")
  with pytest.raises(ValueError, match="`run` column"):
    results.read_results(tmp_path / "a.csv")


def test_unreadable_tables_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such results table; `repeat-lm collect"):
    results.read_results(tmp_path / "missing.csv")
  (tmp_path / "latin1.csv").write_bytes("run,status\ncaf\xe9,done\n".encode("latin-1"))
  with pytest.raises(ValueError, match="latin1.csv is not UTF-8 text"):
    results.read_results(tmp_path / "latin1.csv")
  (tmp_path / "empty.csv").write_text("")
  with pytest.raises(ValueError, match="no runs in the results table"):
    results.read_results(tmp_path / "empty.csv")


def test_the_parquet_table_of_collect_reads_as_its_csv(results_csv):
  # `repeat-lm collect --out=results.parquet` writes numeric columns as float64 and empty cells as nulls.
  with results_csv.open(newline="") as f:
    rows = [{k: results._float(v) if k in {*results.NUMERIC, "DROPOUT_RATE"} else v for k, v in row.items()}
            for row in csv.DictReader(f)]
  rows[0]["best_step"] = math.nan  # an empty cell
  parquet = collect.write_table(rows, results_csv.with_suffix(".parquet"))
  from_csv, from_parquet = results.read_results(results_csv), results.read_results(parquet)
  from_csv[0].best_step = math.nan
  assert [(r.run, r.params, r.model_dir, r.get("DROPOUT_RATE"), r.get("model")) for r in from_parquet] == \
      [(r.run, r.params, r.model_dir, r.get("DROPOUT_RATE"), r.get("model")) for r in from_csv]
  assert math.isnan(from_parquet[0].best_step) and from_parquet[1].best_step == from_csv[1].best_step
  assert results.varied_factors(from_parquet) == results.varied_factors(from_csv)
  (results_csv.parent / "bad.parquet").write_text("not parquet")
  with pytest.raises(ValueError, match="bad.parquet is not a Parquet table"):
    results.read_results(results_csv.parent / "bad.parquet")


def test_nan_cells_are_one_value_when_runs_are_grouped(tmp_path):
  # csv writes a float NaN as "nan": two such cells must group together, as two empty cells do (NaN != NaN).
  from repeat_lm.analysis import degradation
  (tmp_path / "r.csv").write_text("run,epochs,model\na,nan,x\nb,nan,x\nc,4,x\nd,,x\n")
  runs = results.read_results(tmp_path / "r.csv")
  rows = [{"gap": 0.0, "onset_step": None, "onset_epoch": None, "source": "curve"}] * len(runs)
  summary = degradation.factor_summary(runs, rows, "epochs")
  assert [s["runs"] for s in summary] == [1, 3] and summary[0]["epochs"] == 4.0
  assert math.isnan(summary[1]["epochs"])


def test_a_table_saved_by_a_spreadsheet_with_a_byte_order_mark_reads(tmp_path):
  # "CSV UTF-8" from a spreadsheet starts with a BOM: it was read into the first column's name, and the table
  # refused for want of a `run` column.
  (tmp_path / "bom.csv").write_bytes("run,status,params\nbase,done,2.5e8\n".encode("utf-8-sig"))
  (run,) = results.read_results(tmp_path / "bom.csv")
  assert (run.run, run.status, run.params) == ("base", "done", 2.5e8)


def test_a_curve_without_train_records_spreads_the_tokens_seen_evenly_over_the_steps(tmp_path):
  # No train/tokens_seen at all: tokens seen grow linearly with the step, reaching the table's tokens_seen at the
  # step it was counted at, final_step (4000 tokens over 40 steps: 100 a step), not at the last evaluation (30).
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/loss": 3.0}) + "\n"
                                                   for s in (10, 20, 30)))
  run = results.Run(run="r", status="done", model_dir=str(model_dir), tokens_seen=4000.0, extra={"final_step": "40"})
  c = results.load_curve(run, "eval/loss")
  np.testing.assert_allclose(c.tokens_seen, [1000, 2000, 3000])
  assert c.tokens_known


@pytest.mark.parametrize("tokens_seen, final_step", [(math.nan, ""), (4000.0, ""), (math.nan, "40")])
def test_a_curve_without_train_records_or_the_tables_count_has_unknown_tokens_not_its_steps(tmp_path, tokens_seen,
                                                                                            final_step):
  """The step numbers were read as tokens (a factor of the tokens per step off), or the table's tokens_seen spread
  to the last evaluation, whose step need not be the one it was counted at."""
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/loss": 3.0}) + "\n"
                                                   for s in (10, 20, 30)))
  run = results.Run(run="r", status="done", model_dir=str(model_dir), tokens_seen=tokens_seen,
                    extra={"final_step": final_step})
  c = results.load_curve(run, "eval/loss")
  assert np.isnan(c.tokens_seen).all() and not c.tokens_known
  np.testing.assert_array_equal(c.step, [10, 20, 30])


def test_fine_tuning_scores_and_metrics_are_outcomes_not_factors(tmp_path):
  # docs/analysis.md: columns ending in a fine-tuning score's _em / _f1 / _f1a / _accuracy are not factors, nor
  # metrics: names with '/' or starting with final_ / best_ (collect writes final_step and final_train_loss).
  (tmp_path / "r.csv").write_text("run,DROPOUT_RATE,squad_em,squad_f1,squad_f1a,glue_accuracy,final_step,"
                                  "final_train_loss,train/loss\n"
                                  "a,0.0,60,70,71,0.8,100,2.1,2.3\nb,0.1,62,72,73,0.85,90,2.0,2.2\n")
  assert results.varied_factors(results.read_results(tmp_path / "r.csv")) == ["DROPOUT_RATE"]


def test_select_compares_numbers_as_numbers_and_ignores_spaces(tmp_path):
  # 0.1 and 0.10 are one rate; 0.1001 is another. Spaces around `=` and `,` are not part of a column or a value.
  (tmp_path / "r.csv").write_text("run,DROPOUT_RATE,model\na,0.10,moe\nb,0.1001,moe\nc,0.1,dense\n")
  runs = results.read_results(tmp_path / "r.csv")
  assert [r.run for r in results.select(runs, "DROPOUT_RATE=0.1")] == ["a", "c"]
  assert [r.run for r in results.select(runs, "model = moe, DROPOUT_RATE = 0.1")] == ["a"]


def test_a_row_with_more_or_fewer_cells_than_the_header_is_refused(tmp_path):
  # One cell too many (an unquoted comma) shifted every later column: tokens_seen read the params, the loss the
  # tokens, and the shifted numbers entered the fit. csv.DictReader kept the extra cell under the key None.
  (tmp_path / "long.csv").write_text("run,params,tokens_seen,final_eval_loss\na,1e6,5e6,4.1\nb,3e6,3e6,1.5e7,3.9\n")
  with pytest.raises(ValueError, match="long.csv: line 3 has 5 cells, the header 4"):
    results.read_results(tmp_path / "long.csv")
  (tmp_path / "short.csv").write_text("run,params,tokens_seen,final_eval_loss\na,1e6,5e6,4.1\nb,3e6,1.5e7\n")
  with pytest.raises(ValueError, match="short.csv: line 3 has 3 cells, the header 4"):
    results.read_results(tmp_path / "short.csv")
  # A column named twice (tables joined by hand) is named as such, not blamed on a row that has all its cells.
  (tmp_path / "twice.csv").write_text("run,final_eval_loss,params,final_eval_loss\na,4.1,1e6,4.2\n")
  with pytest.raises(ValueError, match="twice.csv: the header names column 'final_eval_loss' more than once"):
    results.read_results(tmp_path / "twice.csv")


@pytest.mark.parametrize("column, cell", [("unique_tokens", "lots"), ("params", "1e6 params"),
                                          ("final_eval_loss", "n/a")])
def test_text_in_a_numeric_column_is_refused_naming_the_line_column_and_value(tmp_path, column, cell):
  # Text read as NaN: in unique_tokens as "every token fresh", in params or the loss as a run silently left out.
  row = {"run": "b", "params": "3e6", "tokens_seen": "3e7", "unique_tokens": "1e6", "final_eval_loss": "3.9",
         column: cell}
  (tmp_path / "t.csv").write_text("run,params,tokens_seen,unique_tokens,final_eval_loss\na,1e6,5e6,1e6,4.1\n"
                                  + ",".join(row.values()) + "\n")
  with pytest.raises(ValueError, match=f"line 3: {column}='{cell}' is not a number"):
    results.read_results(tmp_path / "t.csv")


@pytest.mark.parametrize("column", ["params", "tokens_seen", "unique_tokens", "final_eval_loss"])
def test_a_negative_count_or_loss_is_refused(tmp_path, column):
  # A negative unique_tokens read as "no repetition" and the data-constrained fit went on; a negative loss or count
  # left its run out of the fit unnamed.
  cells = {"run": "b", "params": "3e6", "tokens_seen": "3e7", "unique_tokens": "1e6", "final_eval_loss": "3.9",
           column: "-1e6"}
  (tmp_path / "t.csv").write_text(",".join(cells) + "\n" + ",".join(cells.values()) + "\n")
  with pytest.raises(ValueError, match=f"line 2: {column}=-1e6 is negative"):
    results.read_results(tmp_path / "t.csv")


def test_empty_and_nan_numeric_cells_still_read_as_missing(tmp_path):
  # An unfinished run's empty loss, a run without repetition's empty unique_tokens, and csv's "nan" for a missing
  # float are missing values, not errors; a quoted comma is one cell.
  (tmp_path / "t.csv").write_text('run,params,unique_tokens,final_eval_loss,note\na,1e6,,,"x, y"\nb,2e6,nan,3.5,\n')
  a, b = results.read_results(tmp_path / "t.csv")
  assert math.isnan(a.unique_tokens) and math.isnan(a.final_eval_loss) and a.get("note") == "x, y"
  assert math.isnan(b.unique_tokens) and b.final_eval_loss == 3.5


def test_a_folder_or_a_json_file_given_as_the_table_is_named_as_such(tmp_path):
  """A sweep ROOT was "no such results table" though it exists; a one-line JSON record (`analyze fit --json`) was
  "no runs in the results table", as if its rows were lost."""
  with pytest.raises(ValueError, match=r"is a folder, not a results table: pass the table `repeat-lm collect "
                                       rf"--root={tmp_path}` writes \({tmp_path}/results.csv\)"):
    results.read_results(tmp_path)
  (tmp_path / "results.csv").write_text("run\na\n")
  with pytest.raises(ValueError, match=rf"is a folder, not a results table: pass the table in it "
                                       rf"\({tmp_path}/results.csv\)"):
    results.read_results(tmp_path)
  for name, text in (("fit.json", '{"E": 1.8, "A": 500.0, "law": "chinchilla"}\n'),
                     ("summary.json", '{\n  "runs": [{"run": "a"}]\n}\n'), ("rows.csv", '[{"run": "a"}]\n')):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"{name} holds JSON, not a results table: pass the CSV"):
      results.read_results(tmp_path / name)
