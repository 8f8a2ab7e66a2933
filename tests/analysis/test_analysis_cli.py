"""`repeat-lm analyze ...` and `repeat-lm plan` end to end on the synthetic table: files written, JSON valid."""

import json
import math

import pytest

from repeat_lm import cli
from repeat_lm.analysis import laws


def _strict(constant):
  raise AssertionError(f"{constant} is not JSON (strict parsers such as jq reject it)")


def _json(capsys, argv) -> dict:
  assert cli.main(argv) == 0
  return json.loads(capsys.readouterr().out, parse_constant=_strict)


def _assert_report(out_dir, *pngs):
  for name in ("report.md", "report.html", *pngs):
    assert (out_dir / name).stat().st_size > 0, name


def test_degradation(results_csv, capsys):
  out = _json(capsys, ["analyze", "degradation", f"--results={results_csv}", "--group_by=DROPOUT_RATE", "--json"])
  assert len(out["runs"]) == 25 and "DROPOUT_RATE" in out["by_factor"]
  _assert_report(results_csv.parent / "analysis" / "degradation", "eval_accuracy_by_DROPOUT_RATE.png")
  # Without --json: the Markdown report on stdout.
  assert cli.main(["analyze", "degradation", f"--results={results_csv}", "--metric=eval/loss",
                   f"--out={results_csv.parent / 'loss'}"]) == 0
  assert capsys.readouterr().out.startswith("# Degradation (eval/loss)")
  _assert_report(results_csv.parent / "loss", "eval_loss_by_unique_tokens.png")


def test_default_report_folders_keep_tables_and_laws_apart(results_csv, capsys):
  """Every table of a folder, and both laws' fits, wrote analysis/<command>/: one report silently replaced another."""
  other = results_csv.parent / "other.csv"
  other.write_text(results_csv.read_text())
  for table in (results_csv, other):
    for law in ("chinchilla", "data-constrained"):
      assert cli.main(["analyze", "fit", f"--law={law}", f"--results={table}", "--bootstrap=0", "--json"]) == 0
  capsys.readouterr()
  analysis = results_csv.parent / "analysis"
  for folder in ("fit_chinchilla", "fit_data_constrained", "other/fit_chinchilla", "other/fit_data_constrained"):
    _assert_report(analysis / folder)
  assert "data-constrained" in (analysis / "fit_data_constrained" / "report.md").read_text()


def test_json_has_null_where_a_number_is_missing(tmp_path, capsys):
  # A run without a curve has no best step: NaN in Python, null on stdout (Python's json printed a bare NaN).
  table = tmp_path / "results.csv"
  table.write_text("run,final_eval_accuracy,best_eval_accuracy\nno_curve,0.5,\n")
  out = _json(capsys, ["analyze", "degradation", f"--results={table}", "--json"])
  assert out["runs"][0]["best"] is None and out["runs"][0]["final"] == 0.5


_TOKENS = [50 * 2 ** 16, 200 * 2 ** 16]


@pytest.mark.parametrize("law, flags, runs, fitted_range", [
    # --max_epochs=1 leaves out every run on 2^20 unique tokens, the MoE and dense_xl runs with them.
    ("chinchilla", ["--max_epochs=1"], 9,
     {"params": [1e7, 1e8], "tokens": _TOKENS, "unique_tokens": [2 ** 24, 2 ** 24], "epochs": [1.0, 1.0]}),
    ("data-constrained", [], 25,
     {"params": [1e7, 8e8], "tokens": _TOKENS, "unique_tokens": [2 ** 20, 2 ** 24], "epochs": [1.0, 12.5]})],
    ids=["chinchilla", "data-constrained"])
def test_fit_recovers_the_tables_law_and_predicts_with_its_constants(results_csv, results_law, tmp_path, capsys, law,
                                                                    flags, runs, fitted_range):
  """The table's losses follow results_law; its fresh runs (--max_epochs=1) follow the chinchilla form. The table
  had 2 token counts per size, which neither law can be fitted to, and this test asserted only types: it passed
  E = 10.6, alpha = 3.8 (chinchilla; 1.5, 0.5) and R_D* = 7.6 (data-constrained; 5) with nothing flagged."""
  out_dir = tmp_path / law
  out = _json(capsys, ["analyze", "fit", f"--law={law}", f"--results={results_csv}", "--bootstrap=3", *flags,
                       f"--out={out_dir}", "--json"])
  names = ["E", "A", "B", "alpha", "beta"] + (["R_D_star", "R_N_star"] if law == "data-constrained" else [])
  assert all(isinstance(out[k], float) for k in names) and sorted(out["ci"]) == sorted(names)
  assert all(len(v) == 2 and v[0] <= v[1] for v in out["ci"].values())
  assert out["runs"] == runs and out["at_bounds"] == out["undetermined"] == out["ci_untrusted"] == []
  want = {"alpha": 0.01, "beta": 0.02, "E": 0.1, "R_D_star": 0.25, "R_N_star": 0.5}
  assert {k: out[k] for k in want if k in out} == {k: pytest.approx(getattr(results_law, k), abs=v)
                                                   for k, v in want.items() if k in out}
  assert {"repeated", "left_out", "redrawn", "given_up", "refits_flagged"} <= set(out)
  assert out["fitted_range"] == fitted_range
  _assert_report(out_dir, "fit_observed_vs_predicted.png", "fit_loss_vs_tokens.png")
  constants = tmp_path / "constants.json"
  constants.write_text(json.dumps(out))
  pred = _json(capsys, ["analyze", "predict", f"--law={law}", "--params=1e8", "--tokens=1e10",
                        "--unique-tokens=1e9", f"--constants={constants}", "--json"])
  assert pred["constants"] == {k: out[k] for k in names}


def test_predict_from_a_fit_says_what_it_did_not_determine_and_where_it_extrapolates(results_csv, tmp_path, capsys):
  """A prediction from a fit's constants printed a bare loss: nothing said that the fit had left a constant on a
  bound, or that --params lay four decades past the runs it was fitted to."""
  fit = _json(capsys, ["analyze", "fit", "--law=chinchilla", f"--results={results_csv}", "--bootstrap=0",
                       f"--out={tmp_path / 'fit'}", "--json"])
  (lo_n, hi_n), (lo_d, hi_d) = fit["fitted_range"]["params"], fit["fitted_range"]["tokens"]
  assert 0 < lo_n < hi_n and 0 < lo_d < hi_d
  constants = tmp_path / "constants.json"
  constants.write_text(json.dumps({**fit, "at_bounds": [], "undetermined": []}))
  inside = ["analyze", "predict", "--law=chinchilla", f"--params={hi_n}", f"--tokens={lo_d}",
            f"--constants={constants}", "--json"]
  assert "note" not in _json(capsys, inside)
  outside = _json(capsys, [*inside[:3], f"--params={hi_n * 1e4:g}", *inside[4:]])
  assert f"--params={hi_n * 1e4:g} lies outside the fitted runs' {lo_n:g}-{hi_n:g}: an extrapolation" in \
      outside["note"]
  constants.write_text(json.dumps({**fit, "at_bounds": ["alpha"]}))
  assert "the fit did not determine alpha" in _json(capsys, inside)["note"]
  # Published constants carry no fit record: no caveat.
  assert "note" not in _json(capsys, ["analyze", "predict", "--law=chinchilla", "--params=1e12", "--tokens=1e13",
                                      "--json"])


def test_predict_published(capsys):
  out = _json(capsys, ["analyze", "predict", "--law=chinchilla", "--params=70e9", "--tokens=1.4e12", "--json"])
  assert out["loss"] == pytest.approx(1.69 + 406.4 / 70e9 ** 0.34 + 410.7 / 1.4e12 ** 0.28)
  assert cli.main(["analyze", "predict", "--law=data-constrained", "--params=2.5e8", "--tokens=3.4e10",
                   "--unique_tokens=1.3e8"]) == 0
  assert capsys.readouterr().out.startswith("predicted loss (data-constrained): ")


@pytest.mark.parametrize("flags, named", [(["--params=-1", "--tokens=1e10"], "'--params': -1.0"),
                                          (["--params=1e8", "--tokens=nan"], "'--tokens': nan"),
                                          (["--params=1e8", "--tokens=1e10", "--unique-tokens=0"],
                                           "'--unique-tokens': 0.0")])
def test_predict_refuses_counts_that_are_not_positive(capsys, flags, named):
  assert cli.main(["analyze", "predict", "--law=data-constrained", *flags]) == 2
  assert f"needs positive, finite counts: {{{named}}}" in capsys.readouterr().err


def test_predict_names_its_own_constants_flag(tmp_path, capsys):
  bad = tmp_path / "c.json"
  bad.write_text("{bad")
  assert cli.main(["analyze", "predict", "--law=chinchilla", "--params=1e8", "--tokens=1e10",
                   f"--constants={bad}"]) == 2
  assert f"--constants={bad} is not JSON" in capsys.readouterr().err


def test_chinchilla_check(results_csv, results_law, tmp_path, capsys):
  out = _json(capsys, ["analyze", "chinchilla-check", f"--results={results_csv}", "--bootstrap=3",
                       f"--out={tmp_path}", "--json"])
  assert out["law"] == "data-constrained"  # the table repeats data
  assert out["a"] + out["b"] == pytest.approx(1.0) and out["b_over_a"] == pytest.approx(out["b"] / out["a"])
  # The table's law has b / a = alpha / beta = 5 / 3: tokens should not grow linearly with parameters.
  assert out["b_over_a"] == pytest.approx(results_law.alpha / results_law.beta, abs=0.15)
  assert len(out["b_over_a_ci"]) == 2 and out["linear"] is False
  assert out["verdict"] == "excludes 1: tokens should not grow linearly with parameters"
  assert all(row["tokens_per_param"] > 0 for row in out["budgets"])
  _assert_report(tmp_path, "compute_optimal.png")


def test_proxy(results_csv, tmp_path, capsys):
  out = _json(capsys, ["analyze", "proxy", f"--results={results_csv}", "--sweep=model=moe",
                       "--dense=densexl_*", "--price_per_chip_hour=2", "--chip_flops_per_s=4e14",
                       f"--out={tmp_path}", "--json"])
  moe = {float(k): v for k, v in out["moe_by_rate"].items()}
  assert out["moe_best_rate"] == max(moe, key=moe.get)
  # 5 MoE runs at 2e9 FLOPs/token + one dense at 5e9, vs 5 dense runs; all see the same tokens.
  assert out["cost"]["flops"]["ratio"] == pytest.approx((5 * 2e9 + 5e9) / (5 * 5e9))
  assert out["cost"]["usd"]["ratio"] == pytest.approx(out["cost"]["flops"]["ratio"])
  assert len(out["curve_similarity"]) == 2
  _assert_report(tmp_path, "proxy_final_vs_rate.png", "proxy_curves.png")


def test_plan(results_csv, tmp_path, capsys):
  out = _json(capsys, ["plan", "--unique-tokens=1e8", "--compute=1e20", f"--results={results_csv}",
                       f"--out={tmp_path}", "--json"])
  for key in ("recommended", "chinchilla_optimal", "sufficient", "warnings", "thresholds", "dropout"):
    assert key in out
  assert out["dropout"]["advised"] and out["dropout"]["measured"]["column"] == "DROPOUT_RATE"
  _assert_report(tmp_path, "plan_loss_vs_params.png")
  assert cli.main(["plan", "--unique_tokens=1e12", "--compute=1e20"]) == 0
  assert "Recommended: N = " in capsys.readouterr().out


def test_plan_from_a_fit_warns_of_what_it_did_not_determine_and_where_it_extrapolates(tmp_path, capsys):
  """A fit with R_N* on its bound (no run past U_N) moved the plan from 6.7e8 parameters to 5.25e9 without a word:
  the plan read the constants of the record and dropped its caveats."""
  record = {**laws.DATA_CONSTRAINED.to_dict(), "R_N_star": math.exp(10), "at_bounds": ["R_N_star"],
            "undetermined": [], "fitted_range": {"params": [1e7, 1e8], "tokens": [1e9, 1e11]}}
  fit = tmp_path / "fit.json"
  fit.write_text(json.dumps(record))
  argv = ["plan", "--unique-tokens=1.3e8", "--compute=1.5e20", f"--law-constants={fit}"]
  out = _json(capsys, [*argv, "--json"])
  caveats = {w["code"]: w["message"] for w in out["warnings"] if w["code"] in ("undetermined_constants",
                                                                               "extrapolation")}
  n = out["recommended"]["params"]
  assert n == pytest.approx(5.25e9, rel=1e-2)
  assert caveats == {"undetermined_constants": "the fit did not determine R_N_star (see its report): this plan "
                                               "rests on that value",
                     "extrapolation": f"the planned N={n:g} lies outside the fitted runs' 1e+07-1e+08: an "
                                      "extrapolation"}
  assert cli.main(argv) == 0
  assert "Warning: the fit did not determine R_N_star" in capsys.readouterr().out
  # Constants without a fit's record (published, or written by hand) carry no caveat.
  fit.write_text(json.dumps({"constants": laws.DATA_CONSTRAINED.to_dict()}))
  for args in (argv, argv[:3]):
    codes = {w["code"] for w in _json(capsys, [*args, "--json"])["warnings"]}
    assert codes == {"exhausted", "excess_params"}


def test_errors(results_csv, capsys):
  assert cli.main(["analyze", "degradation", f"--results={results_csv}", "--group_by=nope"]) == 2
  assert "no such column" in capsys.readouterr().err
  assert cli.main(["analyze", "proxy", f"--results={results_csv}", "--sweep=x*", "--dense=y*"]) == 2
  assert "matched 0" in capsys.readouterr().err
