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
  assert len(runs) == 19
  r = runs[0]
  assert r.run == "dense_n1e+07_u1048576_s100" and r.params == 1e7 and r.unique_tokens == 2 ** 20
  assert r.model_dir == str(results_csv.parent / "runs" / r.run)  # relative to the CSV's folder
  assert r.get("DROPOUT_RATE") == 0.0 and r.get("model") == "dense" and r.get("missing") is None
  assert results.varied_factors(runs) == ["params", "unique_tokens", "epochs", "model", "DROPOUT_RATE"]


def test_select(results_csv):
  runs = results.read_results(results_csv)
  assert [r.run for r in results.select(runs, "moe_*")] == [f"moe_d{x}" for x in (0.1, 0.2, 0.3, 0.4, 0.5)]
  assert [r.run for r in results.select(runs, "model=dense_xl,DROPOUT_RATE=0.3")] == ["densexl_d0.3"]
  assert len(results.select(runs, "model=dense*")) == 14
  assert results.select(runs, "nope=1") == []


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
  rows = [{"gap": 0.0, "onset_step": None, "onset_epoch": None}] * len(runs)
  summary = degradation.factor_summary(runs, rows, "epochs")
  assert [s["runs"] for s in summary] == [1, 3] and summary[0]["epochs"] == 4.0
  assert math.isnan(summary[1]["epochs"])


def test_a_table_saved_by_a_spreadsheet_with_a_byte_order_mark_reads(tmp_path):
  # "CSV UTF-8" from a spreadsheet starts with a BOM: it was read into the first column's name, and the table
  # refused for want of a `run` column.
  (tmp_path / "bom.csv").write_bytes("run,status,params\nbase,done,2.5e8\n".encode("utf-8-sig"))
  (run,) = results.read_results(tmp_path / "bom.csv")
  assert (run.run, run.status, run.params) == ("base", "done", 2.5e8)
