"""MoE-proxy tuning on a hand-made table: best rates, rank agreement and cost ratio worked out by hand."""

import numpy as np
import pytest

from repeat_lm.analysis import proxy, results


def _run(name, rate, acc, flops_per_token, chip_hours=None):
  extra = {"DROPOUT_RATE": str(rate), "model": name.split("_")[0]}
  if chip_hours is not None:
    extra["chip_hours"] = str(chip_hours)
  return results.Run(run=name, status="done", model_dir=None, flops_per_token=flops_per_token, tokens_seen=1e10,
                     final_eval_accuracy=acc, final_eval_loss=3 - acc, extra=extra)


MOE = {0.1: 0.60, 0.2: 0.62, 0.3: 0.63, 0.4: 0.61, 0.5: 0.59}


def _table(dense_accs, moe_hours=None, dense_hours=None):
  moe = [_run(f"moe_d{r}", r, a, 1e9, moe_hours) for r, a in MOE.items()]
  dense = [_run(f"dense_d{r}", r, a, 3e9, dense_hours) for r, a in dense_accs.items()]
  return moe + dense


def test_best_rates_and_perfect_rank_agreement(tmp_path):
  runs = _table({0.1: 0.65, 0.3: 0.67, 0.5: 0.64})
  out = proxy.analyze(runs, "moe_*", "model=dense", tmp_path)
  assert out["rate_column"] == "DROPOUT_RATE"
  assert (out["moe_best_rate"], out["dense_best_rate"], out["same_best_rate"]) == (0.3, 0.3, True)
  assert out["rank_agreement"] == {"rates": [0.1, 0.3, 0.5], "spearman": pytest.approx(1.0),
                                   "kendall": pytest.approx(1.0)}
  # Proxy: 5 MoE runs x 1e9 x 1e10 + one dense run 3e9 x 1e10; direct: 5 dense runs (3 in the table, 2 estimated).
  cost = out["cost"]["flops"]
  assert (cost["proxy"], cost["direct"]) == (pytest.approx(8e19), pytest.approx(15e19))
  assert cost["ratio"] == pytest.approx(8 / 15)
  assert (tmp_path / "report.md").exists() and (tmp_path / "proxy_final_vs_rate.png").exists()


def test_by_loss_the_best_rate_is_the_lowest_loss(tmp_path):
  # Final loss = 3 - accuracy here: the lowest loss is at 0.3 on both sides (2.37 and 2.33), the highest at 0.5.
  out = proxy.analyze(_table({0.1: 0.65, 0.3: 0.67, 0.5: 0.64}), "moe_*", "dense_*", tmp_path, metric="eval/loss")
  assert (out["moe_best_rate"], out["dense_best_rate"]) == (0.3, 0.3)
  assert out["moe_by_rate"][0.3] == pytest.approx(2.37)


def test_partial_rank_agreement(tmp_path):
  out = proxy.analyze(_table({0.1: 0.65, 0.3: 0.67, 0.5: 0.66}), "moe_*", "dense_*", tmp_path)
  # Ranks over (0.1, 0.3, 0.5): MoE (2, 3, 1), dense (1, 3, 2): d = (1, 0, -1), Spearman 1 - 6*2/(3*8) = 0.5;
  # Kendall: pairs (0.1,0.3) concordant, (0.1,0.5) discordant, (0.3,0.5) concordant: (2 - 1) / 3.
  assert out["rank_agreement"]["spearman"] == pytest.approx(0.5)
  assert out["rank_agreement"]["kendall"] == pytest.approx(1 / 3)


def test_paper_cost_example(tmp_path):
  # The paper's 0.48x: MoE sweep 10.6K USD (5 x 2.12K), one dense run 7.4K, dense sweep 5 x 7.4K = 37K.
  runs = _table({0.3: 0.67}, moe_hours=2120, dense_hours=7400)
  out = proxy.analyze(runs, "moe_*", "dense_*", tmp_path, price_per_chip_hour=1.0)
  usd = out["cost"]["usd"]
  assert (usd["proxy_sweep"], usd["dense_run"], usd["proxy"], usd["direct"]) == (
      pytest.approx(10600), pytest.approx(7400), pytest.approx(18000), pytest.approx(37000))
  assert usd["ratio"] == pytest.approx(18 / 37)
  assert out["rank_agreement"]["spearman"] is None  # one dense rate: nothing to rank


def test_chip_hours_from_throughput():
  run = _run("moe_d0.1", 0.1, 0.6, 1e9)
  assert proxy.run_chip_hours(run, chip_flops_per_s=1e15) == pytest.approx(1e19 / 1e15 / 3600)
  assert proxy.run_chip_hours(run, None) is None


def test_curve_similarity():
  t = np.linspace(0, 1e9, 30)
  a = results.Curve(np.arange(30.0), t, 0.6 - 0.3 * np.exp(-t / 2e8))
  b = results.Curve(np.arange(30.0), t, a.value - 0.02)
  s = proxy.curve_similarity(a, b)
  assert s["pearson"] == pytest.approx(1.0)
  assert s["mad_normalised"] == pytest.approx(0.0, abs=1e-12)
  assert s["mad_raw"] == pytest.approx(0.02)


def test_selection_errors(tmp_path):
  runs = _table({0.3: 0.67})
  with pytest.raises(ValueError, match="matched 0"):
    proxy.analyze(runs, "nothing_*", "dense_*", tmp_path)
  with pytest.raises(ValueError, match="both"):
    proxy.analyze(runs, "*", "dense_*", tmp_path)


def test_direct_cost_counts_the_seeds_the_sweep_ran(tmp_path):
  """Two seeds per rate on both sides: the direct sweep costs 10 dense runs, not 5, as the proxy's costs 10 MoE runs."""
  moe = [_run(f"moe_d{r}_s{s}", r, a + 0.01 * s, 1e9) for r, a in MOE.items() for s in (0, 1)]
  dense = [_run(f"dense_d{r}_s{s}", r, a + 0.05 + 0.01 * s, 3e9) for r, a in MOE.items() for s in (0, 1)]
  cost = proxy.analyze(moe + dense, "moe_*", "dense_*", tmp_path)["cost"]["flops"]
  assert (cost["proxy"], cost["direct"]) == (pytest.approx(10e19 + 3e19), pytest.approx(30e19))


def test_a_nan_chip_hours_cell_without_a_throughput_leaves_chip_hours_out(tmp_path):
  # csv writes a missing float as "nan": that run has no chip-hours, so no chip-hour (or USD) cost, not a crash.
  runs = _table({0.3: 0.67}, moe_hours=2120, dense_hours=7400)
  runs[1].extra["chip_hours"] = "nan"
  out = proxy.analyze(runs, "moe_*", "dense_*", tmp_path, price_per_chip_hour=1.0)
  assert set(out["cost"]) == {"flops"}
  # A throughput fills it in.
  out = proxy.analyze(runs, "moe_*", "dense_*", tmp_path, price_per_chip_hour=1.0, chip_flops_per_s=1e15)
  assert out["cost"]["chip_hours"]["proxy_sweep"] == pytest.approx(4 * 2120 + 1e19 / 1e15 / 3600)


def test_curve_similarity_of_a_diverged_run_is_nan():
  """A NaN evaluation (divergence) leaves no shape to compare: not a flat line 0.5 away from the other curve."""
  t = np.linspace(0, 1e9, 30)
  a = results.Curve(np.arange(30.0), t, 0.3 + 0.3 * t / 1e9)
  b = results.Curve(np.arange(30.0), t, np.where(np.arange(30) == 29, np.nan, a.value))
  s = proxy.curve_similarity(a, b)
  assert np.isnan(s["pearson"]) and np.isnan(s["mad_normalised"]) and np.isnan(s["mad_raw"])


def test_a_nan_rate_is_no_rate(tmp_path):
  # A `nan` rate cell grouped as a rate of its own would win this sweep (0.70) as its best "rate".
  runs = _table({0.3: 0.67}) + [_run("moe_dnan", "nan", 0.70, 1e9)]
  with pytest.raises(ValueError, match="DROPOUT_RATE: no rate in run.s. moe_dnan"):
    proxy.analyze(runs, "moe_*", "dense_*", tmp_path)


@pytest.mark.parametrize("kwargs", [{"price_per_chip_hour": -1.0}, {"price_per_chip_hour": float("nan")},
                                    {"chip_flops_per_s": -1e15}, {"chip_flops_per_s": float("nan")}])
def test_a_price_or_throughput_that_is_not_positive_and_finite_is_refused(tmp_path, kwargs):
  """The command took them as floats: price -1 reported the paper's example as -18,000 vs -37,000 USD, a throughput
  of -1e15 negative chip-hours and NaN NaN costs."""
  with pytest.raises(ValueError, match="must be a positive, finite number"):
    proxy.analyze(_table({0.3: 0.67}, moe_hours=2120, dense_hours=7400), "moe_*", "dense_*", tmp_path, **kwargs)


def test_a_given_rate_column_that_is_wrong_is_named_not_asked_for():
  """--rate_column=dropout (misspelt) said "No rate column: pass --rate_column", the flag just passed."""
  runs = _table({0.1: 0.65, 0.3: 0.67})
  with pytest.raises(ValueError, match="--rate_column=dropout: no such column"):
    proxy.rate_column(runs, "dropout")
  with pytest.raises(ValueError, match="--rate_column=model: no numeric rate in any run"):
    proxy.rate_column(runs, "model")
  assert proxy.rate_column(runs, "DROPOUT_RATE") == proxy.rate_column(runs) == "DROPOUT_RATE"


@pytest.mark.parametrize("flops, reason", [(0.0, "zero in run"), (float("nan"), "missing in run"),
                                           (-6e6, "negative in run")])
def test_a_cost_that_cannot_be_computed_is_undefined_with_its_reason(tmp_path, flops, reason):
  """flops_per_token 0 ended in a ZeroDivisionError traceback, an empty one in "nan vs nan FLOPs = **nanx**", a
  negative one in a confident 1.250x of two negative costs."""
  runs = _table({0.1: 0.65, 0.3: 0.67, 0.5: 0.64})
  for r in runs:
    r.flops_per_token = flops
  out = proxy.analyze(runs, "moe_*", "dense_*", tmp_path)
  assert "flops" not in out["cost"]
  assert reason in out["cost_undefined"]["flops"] and "moe_d0.1" in out["cost_undefined"]["flops"]
  text = (tmp_path / "report.md").read_text()
  assert "in FLOPs undefined: The FLOPs (flops_per_token x tokens_seen) of a run must be a positive" in text
  assert "nan" not in text.split("Tuning cost")[1].split("\n")[0]
  with pytest.raises(ValueError, match=reason):
    proxy.tuning_cost(runs[:5], runs[5:], "DROPOUT_RATE", [0.3])


def test_zero_chip_hours_are_undefined_not_a_division_by_zero(tmp_path):
  out = proxy.analyze(_table({0.3: 0.67}, moe_hours=0, dense_hours=0), "moe_*", "dense_*", tmp_path,
                      price_per_chip_hour=1.0)
  assert set(out["cost"]) == {"flops"} and "zero in run(s) moe_d0.1" in out["cost_undefined"]["chip_hours"]
  assert "In chip-hours: undefined: The chip-hours" in (tmp_path / "report.md").read_text()


def test_rank_agreement_of_a_diverged_or_tied_sweep_is_undefined_not_nan(tmp_path):
  # A diverged MoE run (NaN final metric at one rate) or a dense sweep tied at every rate printed "Spearman nan,
  # Kendall nan" in report.md.
  runs = _table({0.1: 0.65, 0.3: 0.67, 0.5: 0.64})
  runs[0].final_eval_accuracy = float("nan")  # moe_d0.1 diverged
  out = proxy.analyze(runs, "moe_*", "dense_*", tmp_path)
  assert out["rank_agreement"] == {"rates": [0.1, 0.3, 0.5], "spearman": None, "kendall": None}
  text = (tmp_path / "report.md").read_text()
  assert "rank agreement of final eval/accuracy: undefined (the final metric is NaN at 0.1: a diverged run)" in text
  assert "Spearman nan" not in text
  out = proxy.analyze(_table({0.1: 0.65, 0.3: 0.65, 0.5: 0.65}), "moe_*", "dense_*", tmp_path)
  assert out["rank_agreement"]["spearman"] is None
  assert "undefined (one side's final metric is the same at every rate" in (tmp_path / "report.md").read_text()


def test_one_dense_rate_is_no_agreement_and_a_pending_side_is_named(tmp_path):
  # RQ4's design: one dense run, at the MoE's best. "best 0.3 (the same rate)" read as if the dense model agreed.
  out = proxy.analyze(_table({0.3: 0.67}), "moe_*", "dense_*", tmp_path)
  assert out["same_best_rate"] is None
  assert "Dense: 1 runs, all at 0.3: one rate, so whether it is the dense model's best is not measured." in (
      tmp_path / "report.md").read_text()
  # The dense run still pending: "No run has a finite final metric." was false for the MoE side.
  pending = _table({0.3: float("nan")})
  pending[-1].status = "pending"
  with pytest.raises(ValueError, match=r"No --dense run has a finite final eval/accuracy \(dense_d0.3 \(pending\)\)"):
    proxy.analyze(pending, "moe_*", "dense_*", tmp_path / "p")


def test_an_unfinished_run_is_left_out_and_the_answer_called_provisional(tmp_path):
  # A second seed at 0.3 still running (no final metric yet) made the rate's mean NaN: 0.3, the best finished rate,
  # was passed over, "a different rate" stated, the NaN blamed on "a diverged run", and its half-run costed.
  runs = _table({0.1: 0.65, 0.3: 0.67, 0.5: 0.64})
  runs.insert(3, results.Run(run="moe_d0.3_s1", status="running", model_dir=None, flops_per_token=1e9,
                             tokens_seen=5e9, extra={"DROPOUT_RATE": "0.3", "model": "moe"}))
  out = proxy.analyze(runs, "moe_*", "model=dense", tmp_path)
  assert (out["moe_best_rate"], out["same_best_rate"], out["unfinished"]) == (0.3, True, {"moe_d0.3_s1": "running"})
  assert out["moe_by_rate"][0.3] == pytest.approx(0.63) and out["rank_agreement"]["spearman"] == pytest.approx(1.0)
  assert "flops" not in out["cost"] and "have not finished (moe_d0.3_s1: running)" in out["cost_undefined"]["flops"]
  text = (tmp_path / "report.md").read_text()
  assert "**Provisional**: 1 run(s) have not finished (`moe_d0.3_s1` (running))" in text and "diverged" not in text


def test_rates_that_tie_are_all_best_and_agree_with_a_dense_best_among_them(tmp_path):
  """The MoE sweep ties 0.2 and 0.3: max() named 0.2, the report called the dense best 0.3 "a different rate", and
  the proxy was charged the dense run at 0.2."""
  moe = [_run(f"moe_d{r}", r, a, 1e9) for r, a in {0.1: 0.60, 0.2: 0.63, 0.3: 0.63, 0.4: 0.61}.items()]
  dense = [_run(f"dense_d{r}", r, a, fpt) for r, a, fpt in ((0.1, 0.64, 3e9), (0.2, 0.665, 2e9), (0.3, 0.67, 4e9),
                                                            (0.4, 0.65, 3e9))]
  out = proxy.analyze(moe + dense, "moe_*", "dense_*", tmp_path)
  assert (out["moe_best_rate"], out["moe_tied_rates"]) == (None, [0.2, 0.3])
  assert (out["dense_best_rate"], out["dense_tied_rates"], out["same_best_rate"]) == (0.3, [], True)
  # One dense run at 0.2 or 0.3, not known which: the mean of their costs, (2e9 + 4e9) / 2 x 1e10.
  cost = out["cost"]["flops"]
  assert (cost["dense_run"], cost["proxy"], cost["direct"]) == (
      pytest.approx(3e19), pytest.approx(7e19), pytest.approx(12e19))
  text = (tmp_path / "report.md").read_text()
  assert "best 0.2 and 0.3 (a tie). Dense: 4 runs; best 0.3 (among the MoE sweep's tied best)." in text
  assert "one dense run at 0.2 or 0.3, a tie: costed as the mean dense run at those rates" in text
  # A dense best outside the tie is a different rate.
  dense[0].final_eval_accuracy = 0.7
  out = proxy.analyze(moe + dense, "moe_*", "dense_*", tmp_path / "other")
  assert (out["dense_best_rate"], out["same_best_rate"]) == (0.1, False)
  assert "Dense: 4 runs; best 0.1 (a different rate)." in (tmp_path / "other" / "report.md").read_text()


def test_best_rates_name_every_rate_that_ties_even_to_rounding():
  # The mean of three seeds 0.1, 0.2, 0.3 is 0.20000000000000004: a tie with 0.2 all the same.
  assert proxy.best_rates({0.1: float(np.mean([0.1, 0.2, 0.3])), 0.2: 0.2, 0.3: 0.1}, True) == [0.1, 0.2]
  assert proxy.best_rates({0.3: 1.5, 0.1: 2.0, 0.2: 1.5, 0.4: float("nan")}, False) == [0.2, 0.3]
  assert proxy.best_rates({0.1: float("nan")}, True) == []


def test_a_curve_of_unknown_tokens_seen_is_not_compared_on_its_steps(tmp_path):
  """Eval-only logs without tokens_seen in the table: the two curves were lined up on their step numbers."""
  import json
  runs = _table({0.1: 0.65, 0.3: 0.67, 0.5: 0.64})
  for r in runs:
    if r.get("DROPOUT_RATE") == 0.3:
      r.model_dir = str(tmp_path / r.run)
      (tmp_path / r.run).mkdir()
      (tmp_path / r.run / "metrics.jsonl").write_text("".join(
          json.dumps({"step": s, "eval/accuracy": a}) + "\n" for s, a in ((100, 0.5), (200, 0.6), (300, 0.62))))
  out = proxy.analyze(runs, "moe_*", "dense_*", tmp_path / "out")
  assert out["curve_similarity"] == [] and out["curves_without_tokens"] == ["moe_d0.3", "dense_d0.3"]
  text = (tmp_path / "out" / "report.md").read_text()
  assert "The curves of `moe_d0.3`, `dense_d0.3` have no tokens seen" in text
  assert not (tmp_path / "out" / "proxy_curves.png").exists()


def test_a_sweep_of_one_moe_rate_chose_nothing_and_agrees_with_nothing(tmp_path):
  """One MoE run (or seeds at one rate): its rate is "best" by construction, and same_best_rate was true whenever the
  dense model's best happened to be that rate, reported as "best 0.3 (the same rate)"."""
  runs = [_run("moe_d0.3", 0.3, 0.60, 1e9)] + [_run(f"dense_d{r}", r, a, 3e9)
                                               for r, a in {0.1: 0.65, 0.3: 0.67, 0.5: 0.64}.items()]
  out = proxy.analyze(runs, "moe_*", "dense_*", tmp_path)
  assert (out["moe_best_rate"], out["dense_best_rate"], out["same_best_rate"]) == (0.3, 0.3, None)
  text = (tmp_path / "report.md").read_text()
  assert ("MoE sweep: 1 runs over DROPOUT_RATE = 0.3: one rate, so the sweep chose nothing and says nothing of the "
          "dense model's best rate. Dense: 3 runs; best 0.3." in text)
  assert "the same rate" not in text


def test_rank_agreement_from_fewer_than_3_shared_rates_is_said_to_be_unmeasured(tmp_path):
  """Two dense rates: the JSON's rank agreement was null and the report said nothing of it, as if it had not been
  asked (RQ4's statistic)."""
  out = proxy.analyze(_table({0.1: 0.65, 0.3: 0.67}), "moe_*", "dense_*", tmp_path)
  assert out["rank_agreement"] == {"rates": [0.1, 0.3], "spearman": None, "kendall": None}
  assert ("Rank agreement needs 3 rates that both ran; they share 2 (0.1 and 0.3), so it is not measured."
          in (tmp_path / "report.md").read_text())


def test_a_price_without_chip_hours_says_why_there_is_no_usd_cost(tmp_path):
  """--price_per_chip_hour with neither a chip_hours column nor --chip_flops_per_s: the report gave FLOPs alone, and
  the asked-for chip-hour and USD costs were missing without a word (cost_undefined empty)."""
  out = proxy.analyze(_table({0.1: 0.65, 0.3: 0.67}), "moe_*", "dense_*", tmp_path, price_per_chip_hour=3.2)
  assert set(out["cost"]) == {"flops"} and set(out["cost_undefined"]) == {"chip_hours", "usd"}
  why = out["cost_undefined"]["chip_hours"]
  assert "moe_d0.1" in why and "--chip_flops_per_s" in why
  text = (tmp_path / "report.md").read_text()
  assert "In chip-hours: undefined: run(s) moe_d0.1" in text and "In USD: undefined: there is no cost in" in text
  # Not asked for (no price, no chip_hours anywhere): nothing to say.
  assert proxy.analyze(_table({0.1: 0.65, 0.3: 0.67}), "moe_*", "dense_*", tmp_path / "b")["cost_undefined"] == {}


def test_a_selector_on_a_column_the_table_lacks_is_named(tmp_path):
  # --sweep='modle=moe' matched nothing and the error said only "matched 0 runs".
  with pytest.raises(ValueError, match=r"matched 0 runs .*\(--sweep: no column 'modle'; columns: run, status, "):
    proxy.analyze(_table({0.3: 0.67}), "modle=moe", "model=dense", tmp_path)
