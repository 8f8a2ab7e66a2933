"""The benchmark times the trainer's own step, and reports numbers consistent with the FLOP counter."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from repeat_lm import bench
from repeat_lm.bench import profile, train as bench_train
from repeat_lm.models import EncoderDecoderModel, T5Config, Transformer
from repeat_lm.train import flops, partitioning, state as state_lib

CFG = bench_train.BenchConfig(batch_size=8, inputs_length=32, targets_length=8, steps=2, rounds=2, warmup=1)


def tiny():
  return EncoderDecoderModel(module=Transformer(T5Config(
      vocab_size=512, dtype="float32", emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=2,
      num_decoder_layers=2)))


def test_bench_step_is_the_trainers_step_and_computes_the_model_loss(monkeypatch):
  built = []
  real = state_lib.make_train_step
  monkeypatch.setattr(state_lib, "make_train_step", lambda *a, **k: built.append(a) or real(*a, **k))
  model = tiny()
  step = bench_train.JaxStep(model, CFG, partitioning.Partitioner(4, 2))
  assert len(built) == 1  # The benchmark built its step with the trainer's constructor.
  params0 = jax.device_get(step.state["params"])
  host = bench_train.synthetic_batch(CFG, model.vocab_size, CFG.seed)
  _, expected = jax.jit(model.loss_and_metrics)(params0, host)  # jitted: op by op it takes ~6 s to dispatch
  step.run(1)
  got = jax.device_get(step.last_metrics)
  assert got["loss_sum"] / got["weight_sum"] == pytest.approx(
      float(expected["loss_sum"] / expected["weight_sum"]), rel=1e-5)


def test_run_benchmark_reports_consistent_numbers():
  r = bench_train.run_benchmark(tiny(), CFG, partitioner=partitioning.Partitioner(4, 2))
  for key in ("step_time_s", "tokens_per_s", "model_tflops_per_s", "mfu", "compile_time_s"):
    assert np.isfinite(r[key]) and r[key] > 0
  assert r["tokens_per_s"] == pytest.approx(8 * 40 / r["step_time_s"])
  assert CFG.warmup <= r["warmup_steps"] <= bench_train.MAX_WARMUP_STEPS
  per_seq = flops.train_flops_per_sequence(tiny().module.config, 32, 8)
  assert r["model_tflops_per_s"] == pytest.approx(8 * per_seq / r["step_time_s"] / 1e12)
  # MFU = model FLOPs per step / (step time x peak FLOP/s) (reference.md section 6): `bench accelerator`'s table
  # prints this field as it is.
  assert r["mfu"] == pytest.approx(8 * per_seq / (r["step_time_s"] * r["peak_flops"]))
  assert r["step_time_min_s"] <= r["step_time_s"] <= r["step_time_max_s"]
  # A CPU result names its processor: the measured peak, and so the MFU, hold for that processor only.
  assert r["device"] == "8 x cpu" and r["host"] == bench.host_cpu()
  assert bench_train.format_report(r).startswith(f"device 8 x cpu ({r['host']}), mesh")


def test_compile_only_allocates_nothing_and_counts_params():
  r = bench_train.compile_only(tiny(), CFG, partitioning.Partitioner(4, 2))
  assert r["compile_time_s"] > 0 and r["params"] > 0


def test_compare_hf_runs_the_peer_in_its_own_process_and_stops_it():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import multiprocessing
  r = bench_train.run_benchmark(tiny(), CFG, compare_hf=True, partitioner=partitioning.Partitioner(4, 2))
  assert r["speedup_vs_hf"] == pytest.approx(r["tokens_per_s"] / r["hf"]["tokens_per_s"])
  assert r["hf"]["step_time_min_s"] <= r["hf"]["step_time_s"] <= r["hf"]["step_time_max_s"]
  # Round by round: each of Hugging Face's rounds over the repeat_lm round just before it, and their median.
  ours, theirs = r["round_step_times_s"], r["hf"]["round_step_times_s"]
  assert len(ours) == len(theirs) == CFG.rounds and r["step_time_s"] == pytest.approx(np.median(ours))
  assert r["speedup_vs_hf_by_round"] == pytest.approx([h / o for o, h in zip(ours, theirs)])
  assert r["speedup_vs_hf_paired"] == pytest.approx(np.median(r["speedup_vs_hf_by_round"]))
  ratios = r["speedup_vs_hf_by_round"]
  assert (f"; round by round {np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
          in bench_train.format_report(r))
  # The peer's own matmul probe (torch.matmul, run in its process), and its step's share of it.
  hf = r["hf"]
  assert hf["matmul_peak_flops"] > 0
  assert hf["mfu_of_own_peak"] == pytest.approx(r["model_flops_per_step"] / hf["step_time_s"] / hf["matmul_peak_flops"])
  assert (f"({100 * hf['mfu_of_own_peak']:.1f}% of its own torch.matmul probe, "
          f"{hf['matmul_peak_flops'] / 1e12:.3f} TFLOP/s)") in bench_train.format_report(r)
  assert not multiprocessing.active_children()  # the peer was shut down


def test_hf_peer_has_the_models_parameters_untied():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from repeat_lm.bench import hf
  from repeat_lm.models import info
  config = tiny().module.config  # T5 v1.1: the output layer is its own matrix, not the embedding
  model = hf.peer_model(config)
  assert model.lm_head.weight is not model.shared.weight
  assert sum(p.numel() for p in model.parameters()) == info.param_counts(config)["params_total"]


def test_compare_hf_refuses_models_its_peer_is_not():
  from repeat_lm.models import moe
  for config in (dataclasses.replace(tiny().module.config, moe=moe.MoeConfig(num_experts=2, expert_mlp_dim=32)),
                 dataclasses.replace(tiny().module.config, param_share="all")):
    model = EncoderDecoderModel(module=Transformer(config))
    with pytest.raises(ValueError, match="compares dense T5 without parameter sharing"):
      bench_train.run_benchmark(model, CFG, compare_hf=True, partitioner=partitioning.Partitioner(4, 2))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_hf_peer_runs_low_precision_activations_under_autocast(dtype):
  """Mixed precision on both sides: float32 parameters, matmuls in the activation dtype (torch.autocast)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from repeat_lm.bench import hf
  config = dataclasses.replace(tiny().module.config, dtype=dtype)
  threads = torch.get_num_threads()
  try:
    step = hf._TorchStep(config, CFG, threads=threads)  # pylint: disable=protected-access
    seen = []
    step.model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    assert np.isfinite(step.step())
  finally:
    torch.set_num_threads(threads)  # the step sets the process' torch threads
  assert seen == [getattr(torch, dtype)]
  assert {p.dtype for p in step.model.parameters()} == {torch.float32}


def test_torch_matmul_probe_counts_2n_cubed_flops_keeps_the_fastest_run_and_multiplies_in_the_step_dtype(
    monkeypatch):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from repeat_lm.bench import hf
  # As flops.matmul_rate: fake clock, run times 2, 1, 4 s at n = 8, then 4, 8, 16 s at n = 16: 2 x 16^3 / 4.
  ticks = iter(t for d in (2, 1, 4, 4, 8, 16) for t in (0.0, float(d)))
  monkeypatch.setattr(flops.time, "perf_counter", lambda: next(ticks))
  seen = []
  real = torch.matmul
  monkeypatch.setattr(torch, "matmul", lambda a, b: seen.append((a.dtype, a.shape)) or real(a, b))
  assert hf.torch_matmul_rate(torch.bfloat16, (8, 16), 3) == 2048.0
  # One untimed call per size first, then the timed ones, all in the dtype asked for.
  assert seen == [(torch.bfloat16, (8, 8))] * 4 + [(torch.bfloat16, (16, 16))] * 4
  # The step's matmul dtype: its autocast dtype, else float32.
  threads = torch.get_num_threads()
  try:
    for dtype in ("float32", "bfloat16", "float16"):
      config = dataclasses.replace(tiny().module.config, dtype=dtype)
      assert hf._TorchStep(config, CFG, threads=threads).matmul_dtype == dtype  # pylint: disable=protected-access
  finally:
    torch.set_num_threads(threads)


def test_hf_peer_failures_are_runtime_errors_that_say_what_happened(monkeypatch):
  """A peer whose step raises answers with the error and ends; a peer process that dies (the out-of-memory killer's
  SIGKILL mid-round) is named by how it ended, not an EOFError from the pipe."""
  import multiprocessing
  from repeat_lm.bench import hf

  class FailingStep:
    def __init__(self, *args):
      del args

    def run(self, steps):
      raise MemoryError(f"no room for {steps} steps")

  monkeypatch.setattr(hf, "_TorchStep", FailingStep)
  ours, theirs = multiprocessing.Pipe()
  ours.send(("run", 2))  # queued before the peer starts reading
  hf._serve(theirs, None, CFG, 1)  # pylint: disable=protected-access  # returns once it has answered the error
  assert ours.recv() == ("ready", None) and ours.recv() == ("error", "MemoryError: no room for 2 steps")

  class Ended:
    def __init__(self, exitcode):
      self.exitcode = exitcode

    def is_alive(self):
      return False

    def join(self, timeout=None):
      del timeout

  def peer(exitcode, answer=None):
    step = object.__new__(hf.HfStep)
    step._conn, other = multiprocessing.Pipe()  # pylint: disable=protected-access
    step._process = Ended(exitcode)  # pylint: disable=protected-access
    if answer:
      other.send(answer)
      step.peer_end = other  # kept open, as a live peer's is
    else:
      other.close()  # the peer's end of the pipe went with its process
    return step

  with pytest.raises(RuntimeError, match=r"peer failed to run 2 steps: MemoryError: no room for 2 steps$"):
    peer(1, ("error", "MemoryError: no room for 2 steps")).run(2)
  with pytest.raises(RuntimeError, match=r"process was killed by signal 9 \(SIGKILL, which the kernel's out-of-memory "
                                         r"killer sends\) when asked to run 3 steps\. Run without --compare=hf"):
    peer(-9).run(3)
  with pytest.raises(RuntimeError, match="process exited with status 1 when asked to probe its matmul rate"):
    peer(1).matmul_rate((8,), 1)
  assert peer(1, ("done", 0.5)).run(1) == 0.5


def test_report_markdown_has_every_measured_row():
  from repeat_lm.bench import report
  run = {"batch_size": 8, "device": "1 x cpu", "dtype": "float32", "step_time_s": 3.5, "step_time_min_s": 3.4,
         "step_time_max_s": 3.6, "tokens_per_s": 1430.0, "model_tflops_per_s": 0.24, "mfu": 0.5,
         "peak_flops": 4.8e11, "peak_flops_source": "measured", "hf": {"tokens_per_s": 1070.0},
         "model_flops_per_step": 0.84e12,
         "speedup_vs_hf": 1.34, "speedup_vs_hf_by_round": [1.30, 1.36, 1.41], "speedup_vs_hf_paired": 1.36,
         "inputs_length": 512, "targets_length": 114,
         "profile": {"wall_s_per_step": 3.5, "op_seconds_per_step": 3.7,
                     "top": [{"seconds": 0.25, "kind": "ynn_fusion", "shape": "f32[8,512,512]", "source": "mlp/wo"}],
                     "parts": [{"part": "encoder mlp", "seconds": 3.0, "model_flops": 0.72e12},
                               {"part": "everything else", "seconds": 0.7, "model_flops": 0}]}}
  compiled = {"params": 1000, "lower_time_s": 1.0, "compile_time_s": 2.0}
  # A slower probe in another process (0.42 TFLOP/s) leaves the peak at the highest one: every MFU is against it.
  slow_probe = {**run, "step_time_s": 4.2, "peak_flops": 4.2e11}
  # A bfloat16 run's MFU is against the bfloat16 probe (twice as fast here), which leaves the float32 rows alone.
  bf16 = {**run, "dtype": "bfloat16", "step_time_s": 2.0, "peak_flops": 9.6e11, "peak_flops_source": "bf16 probe",
          "hf": {"tokens_per_s": 2000.0, "autocast": "bfloat16"}}
  del bf16["speedup_vs_hf_by_round"], bf16["speedup_vs_hf_paired"]  # a result from before rounds were paired
  text = report.to_markdown({"train": [run, bf16], "ablations": [("as shipped", run), ("no malloc", slow_probe)],
                             "compile": [(size, compiled) for size in report.ZOO], "steps": 3, "rounds": 5})
  assert "--batch_size=8 --steps=3 --rounds=5 --compare=hf`" in text  # the command that ran, not the defaults
  assert "| float32 | 3.500 (3.400-3.600) | 1430 | 0.240 | 50.0% | 1070 | 1.34x | 1.36x (1.30-1.41) |" in text
  assert "| bfloat16 | 2.000 (3.400-3.600) | 1430 | 0.240 | 43.8% | 2000 | 1.34x | - |" in text
  assert "\"round by round\" is the median (and range)" in text
  assert "| no malloc | 4.200 (3.400-3.600) | 1430 | 41.7% |" in text
  assert "Peak (float32 rows): 0.480 TFLOP/s (measured; the highest" in text
  assert "Peak (bfloat16 rows): 0.960 TFLOP/s (bf16 probe; the highest" in text
  assert "under `torch.autocast`" in text
  # Without the peer's probe (results from before it was measured): repeat_lm's peak, and '-' for the peer.
  assert "| 1.36x (1.30-1.41) | 0.480 / - | - |" in text and "The matmul probes multiply" not in text
  probed = {**run, "hf": {**run["hf"], "matmul_peak_flops": 2.0e11, "mfu_of_own_peak": 0.5}}
  text_probed = report.to_markdown({"train": [probed], "ablations": [], "compile": []})
  assert "| 1.36x (1.30-1.41) | 0.480 / 0.200 | 50.0% |" in text_probed
  assert "The matmul probes multiply square matrices of the same sizes" in text_probed
  assert "[performance_accelerator.md](performance_accelerator.md)" in text
  assert "| 250.0 | ynn_fusion | `f32[8,512,512]` | `mlp/wo` |" in text
  # The parts against their floor at the float32 peak (0.48 TFLOP/s): 720 GFLOP take 1.5 s there.
  assert "| encoder mlp | 3000.0 | 720.0 | 1500.0 | 1500.0 |" in text
  assert "| all | 3700.0 | 720.0 | 1500.0 | 2200.0 |" in text
  # 1.25 x 1070 tokens/s for 8 x 626 tokens: 3.744 s a step, of which 1.5 s at the floor.
  assert "the step would take 3.744 s, 40.1% MFU: its matmuls at the peak take 1.500 s of that, which leaves " \
         "2.244 s for everything above the floor, against 2.200 s in the profile." in text
  assert all(f"| T5 v1.1 {size} | 1,000 | 1.0 | 2.0 |" in text for size in report.ZOO)
  assert "Host:" not in text  # a result from before results named their host
  # `bench report --no_hf`: no row ran beside Hugging Face, and the command says so.
  alone = {k: v for k, v in run.items() if not k.startswith(("hf", "speedup"))}
  text = report.to_markdown({"train": [alone], "ablations": [], "compile": [], "steps": 3, "rounds": 5})
  assert "Command: `repeat-lm bench train --gin_file=gin/models/t5_1_1_small.gin --batch_size=8 --steps=3 " \
         "--rounds=5` (the bfloat16 row: `--dtype=bfloat16`)" in text
  on_host = {**run, "host": "AMD EPYC (family 25, model 17), 2 CPUs"}
  text = report.to_markdown({"train": [on_host], "ablations": [], "compile": []})
  assert "Host: AMD EPYC (family 25, model 17), 2 CPUs. CPU numbers hold for that processor only" in text


def test_report_keeps_the_rows_of_other_hosts_and_replaces_its_own(monkeypatch, tmp_path):
  from repeat_lm.bench import report
  row = {"batch_size": 8, "device": "1 x cpu", "dtype": "float32", "step_time_s": 4.0, "step_time_min_s": 3.9,
         "step_time_max_s": 4.2, "tokens_per_s": 1252.0, "model_tflops_per_s": 0.21, "peak_flops": 4.25e11,
         "peak_flops_source": "measured", "model_flops_per_step": 0.85e12, "hf": {"tokens_per_s": 500.0},
         "speedup_vs_hf": 2.5, "speedup_vs_hf_by_round": [2.4, 2.6], "speedup_vs_hf_paired": 2.5,
         "inputs_length": 512, "targets_length": 114, "host": "Xeon"}
  measured = []
  monkeypatch.setattr(report, "measure", lambda compare_hf: measured.append(1) or
                      {"train": [{**row, "step_time_s": 4.0 + len(measured)}], "ablations": [], "compile": []})
  out = tmp_path / "performance.md"
  report.write(out)
  assert "On other hosts" not in out.read_text()
  # A host measured earlier (its entry as the history keeps it) stays; this host's own entry is replaced.
  history = json.loads((tmp_path / "performance.json").read_text())
  epyc = {"date": "2026-11-30", "train": [{**history["hosts"]["Xeon"]["train"][0], "mfu": 0.795,
                                           "vs_hf_round_by_round": "1.14x (0.81-1.16)"}]}
  (tmp_path / "performance.json").write_text(json.dumps({"hosts": {**history["hosts"], "EPYC": epyc}}))
  report.write(out)
  hosts = json.loads((tmp_path / "performance.json").read_text())["hosts"]
  assert sorted(hosts) == ["EPYC", "Xeon"] and hosts["EPYC"] == epyc
  # 0.85 TFLOP over a 6 s step at 0.425 TFLOP/s: 33.3% MFU, this host's second report.
  assert hosts["Xeon"]["train"][0]["mfu"] == pytest.approx(1 / 3)
  assert hosts["Xeon"]["train"][0]["vs_hf_round_by_round"] == "2.50x (2.40-2.60)"
  text = out.read_text()
  # repeat_lm's probe as its MFU implies (0.21 model TFLOP/s at 79.5% MFU: 0.264); the peer's, not measured then: '-'.
  assert "| EPYC | 2026-11-30 | float32 | 5.000 (3.900-4.200) | 1252 | 79.5% | 500 | 2.50x | 1.14x (0.81-1.16) | " \
         "0.264 / - | - |" in text
  assert "| Xeon |" not in text and "| float32 | 6.000 (3.900-4.200) |" in text
  # A damaged history stops the report before it measures, and is left as it was.
  del epyc["train"][0]["mfu"]
  for damaged in ("{not json", json.dumps({"hosts": {"EPYC": epyc}}), json.dumps({"hosts": {"EPYC": {"train": 1}}})):
    (tmp_path / "performance.json").write_text(damaged)
    with pytest.raises(ValueError, match="performance.json: not the host history .* left as it is"):
      report.write(out)
    assert (tmp_path / "performance.json").read_text() == damaged
  assert len(measured) == 2
  # Hand edits that would break the table of other hosts stop the report before it measures, not after.
  good = {**history["hosts"]["Xeon"]["train"][0], "mfu": 0.5}
  for bad in ({k: v for k, v in good.items() if k != "dtype"}, {**good, "hf_tokens_per_s": "500"},
              {**good, "speedup_vs_hf": "2.5x"}, {**good, "vs_hf_round_by_round": 1.1},
              {**good, "hf_matmul_tflops": "0.2"}, {**good, "hf_mfu_of_own_peak": [0.5]}):
    damaged = json.dumps({"hosts": {"EPYC": {"date": "2026-11-30", "train": [bad]}}})
    (tmp_path / "performance.json").write_text(damaged)
    with pytest.raises(ValueError, match="performance.json: not the host history .* left as it is"):
      report.write(out)
    assert (tmp_path / "performance.json").read_text() == damaged
  damaged = json.dumps({"hosts": {"EPYC": {"date": 20261130, "train": [good]}, "AMD": {"train": [good]}}})
  (tmp_path / "performance.json").write_text(damaged)
  with pytest.raises(ValueError, match="the date of 'EPYC' is not a string"):
    report.write(out)
  assert len(measured) == 2
  # A row with no Hugging Face numbers (null, as a --no_hf report or a hand edit leaves them) still prints.
  (tmp_path / "performance.json").write_text(json.dumps(
      {"hosts": {"EPYC": {"date": "2026-11-30", "train": [{**good, "hf_tokens_per_s": None, "speedup_vs_hf": None}]}}}))
  report.write(out)
  assert "| EPYC | 2026-11-30 | float32 | 5.000 (3.900-4.200) | 1252 | 50.0% | nan | nanx | 2.50x (2.40-2.60) |" \
      in out.read_text()
  # A row with the peer's probe keeps it (as the history entry of a report with the probe writes it).
  probed = {**good, "hf_matmul_tflops": 0.2, "hf_mfu_of_own_peak": 0.45, "mfu": 0.7}
  (tmp_path / "performance.json").write_text(json.dumps({"hosts": {"EPYC": {"date": "2026-11-30",
                                                                              "train": [probed]}}}))
  report.write(out)
  assert "| 2.50x (2.40-2.60) | 0.300 / 0.200 | 45.0% |" in out.read_text()


def test_profile_attributes_the_step_to_named_hlo_ops(tmp_path):
  # One device: on the 8-device test mesh the tiny model's time is collectives and rendezvous waits.
  one = partitioning.Partitioner(1, 1, devices=jax.devices()[:1])
  r = bench_train.run_benchmark(tiny(), CFG, partitioner=one, profile_dir=str(tmp_path / "prof"))
  p = r["profile"]
  assert p["op_seconds_per_step"] > 0 and p["top"]
  # Ops are named by the optimized HLO, so time traces back to the model's own source ops.
  assert any("Transformer.encode/encoder/layers_N" in t["source"] for t in p["top"])
  # Every op is in one part; the parts carry the whole step's model FLOPs, and the model's parts do take time.
  assert [row["part"] for row in p["parts"]] == [*flops.PARTS, profile.OTHER_PART]
  assert sum(row["seconds"] for row in p["parts"]) == pytest.approx(p["op_seconds_per_step"])
  assert sum(row["model_flops"] for row in p["parts"]) == r["model_flops_per_step"]
  assert all(row["seconds"] > 0 for row in p["parts"])
  text = (tmp_path / "prof" / "ops.md").read_text()
  assert "| ms/step | kernel | shape | source op |" in text and "layers_N" in text
  assert list((tmp_path / "prof").glob("**/*.xplane.pb"))


@pytest.mark.parametrize("flag,value", [("batch_size", 0), ("steps", 0), ("rounds", -1), ("inputs_length", -3),
                                        ("targets_length", 0)])
def test_bad_sizes_name_the_flag(flag, value):
  with pytest.raises(ValueError, match=f"--{flag}={value}: must be a positive integer"):
    bench_train.BenchConfig(**{flag: value})


def test_unknown_dtype_lists_the_choices():
  with pytest.raises(ValueError, match="--dtype='float8': choose 'auto' or one of float32, bfloat16, float16"):
    bench_train.with_dtype(tiny(), "float8")
  assert bench_train.with_dtype(tiny(), "bfloat16").module.config.dtype == "bfloat16"


def test_cli_reports_bad_bench_flags_without_a_traceback(capsys):
  from repeat_lm import cli
  assert cli.main(["bench", "train", "--gin_file=gin/models/t5_1_1_tiny.gin", "--batch_size=0"]) == 2
  assert "--batch_size=0: must be a positive integer" in capsys.readouterr().err
  assert cli.main(["bench", "train", "--gin_file=gin/models/t5_1_1_tiny.gin", "--dtype=float8"]) == 2
  assert "--dtype='float8'" in capsys.readouterr().err


@pytest.mark.parametrize("changes", [{"droppath_rate": 0.1},
                                     {"dropout_rate": 0.1, "attention_dropout_rate": 0.0, "mlp_dropout_rate": 0.0},
                                     {"hidden_dropout_rate": 0.1},
                                     {"dropout_rate": 0.1, "dropout_broadcast_length": True}])
def test_compare_hf_refuses_regularisers_its_peer_would_not_run(changes):
  """Hugging Face's T5 has one dropout_rate and no DropPath: a peer built from these would do other work."""
  from repeat_lm.bench import hf
  with pytest.raises(ValueError, match="one dropout rate everywhere and has no DropPath"):
    hf.check_comparable(dataclasses.replace(tiny().module.config, **changes))
  # One rate drawn per element: the peer's too.
  hf.check_comparable(dataclasses.replace(tiny().module.config, dropout_rate=0.1, dropout_broadcast_length=False))


def test_compare_hf_without_torch_fails_with_the_install_hint_before_compiling(monkeypatch):
  import sys
  from repeat_lm.bench import hf
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
  monkeypatch.setattr(bench_train, "JaxStep", lambda *a, **k: pytest.fail("compiled before finding torch missing"))
  with pytest.raises(RuntimeError, match="--compare=hf needs PyTorch and transformers") as e:
    bench_train.run_benchmark(tiny(), CFG, compare_hf=True, partitioner=partitioning.Partitioner(4, 2))
  assert str(e.value) == hf.INSTALL_HINT


def test_a_gin_whose_model_is_not_a_model_is_refused_by_name(capsys):
  from repeat_lm import cli
  assert cli.main(["bench", "train", "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin.MODEL=@t5.T5Config()"]) == 2
  assert "The gin's MODEL is a T5Config, not a model (EncoderDecoderModel)" in capsys.readouterr().err


def test_compare_hf_refuses_an_mlp_its_peer_cannot_express_before_compiling(monkeypatch):
  from repeat_lm.bench import hf
  monkeypatch.setattr(bench_train, "JaxStep", lambda *a, **k: pytest.fail("compiled before the check"))
  model = EncoderDecoderModel(module=Transformer(dataclasses.replace(tiny().module.config,
                                                                     mlp_activations=("gelu", "gelu"))))
  with pytest.raises(ValueError, match="no Hugging Face T5 equivalent"):
    bench_train.run_benchmark(model, CFG, compare_hf=True, partitioner=partitioning.Partitioner(4, 2))


def test_report_ablations_are_one_command_each_the_shipped_row_included(monkeypatch):
  from repeat_lm.bench import report
  calls = []
  monkeypatch.setattr(report, "run_bench", lambda args, env=None, timeout_s=None: calls.append((args, env)) or
                      {"args": args, "env": env})
  m = report.measure(compare_hf=True)
  rows = [r for _, r in m["ablations"]]
  assert [name for name, _ in m["ablations"]] == [name for name, _ in report.ABLATIONS]
  assert all(r["args"] == rows[0]["args"] for r in rows)  # no row ran beside Hugging Face or under the profiler
  assert not any(a.startswith(("--compare", "--profile_dir")) for a in rows[0]["args"])


def test_report_lists_the_other_hosts_newest_first():
  from repeat_lm.bench import report
  row = {"dtype": "float32", "step_time_s": 4.0, "step_time_min_s": 3.9, "step_time_max_s": 4.2, "tokens_per_s": 1252.0,
         "mfu": 0.5}
  others = {"A": {"date": "2026-10-01", "train": [row]}, "B": {"date": "2026-11-30", "train": [row]},
            "C": {"date": "2026-11-02", "train": [row]}}
  lines = [line for line in report.other_hosts_lines(others) if line.startswith(("| A |", "| B |", "| C |"))]
  assert [line[2] for line in lines] == ["B", "C", "A"]


def test_run_bench_removes_the_variables_set_to_none_and_reads_the_json_after_the_logs(monkeypatch):
  import subprocess
  from repeat_lm.bench import report
  seen = {}

  def fake_run(cmd, env, **kwargs):
    seen.update(cmd=cmd, env=env)
    return subprocess.CompletedProcess(cmd, 0, stdout='{"log": "not the result"}\n{"step_time_s": 4.0}\n', stderr="")

  monkeypatch.setattr(report.subprocess, "run", fake_run)
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
  assert report.run_bench(["--steps=1"], {"GLIBC_TUNABLES": None, "REPEAT_LM_HOST_MALLOC": "0"}) == \
      {"step_time_s": 4.0}
  assert "GLIBC_TUNABLES" not in seen["env"] and seen["env"]["REPEAT_LM_HOST_MALLOC"] == "0"
  assert seen["cmd"][-3:] == ["train", "--json", "--steps=1"]
  # An XLA_FLAGS row adds its flag to the inherited ones: replaced whole, the forced device count of the other rows
  # was dropped from the YNNPACK rows alone (1 device against 8, credited to the setting).
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=x")
  report.run_bench(["--steps=1"], {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"})
  assert seen["env"]["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                      "--xla_cpu_experimental_ynn_fusion_type=dot")


def test_report_checks_its_out_before_measuring(tmp_path, monkeypatch):
  # A directory, or a file where a folder should be, failed after the half-hour measurement and lost it; a .json
  # --out was overwritten by its own history.
  from repeat_lm.bench import report
  monkeypatch.setattr(report, "measure", lambda **kwargs: pytest.fail("measured before checking --out"))
  (tmp_path / "file").write_text("")
  for out, match in ((tmp_path, "is a directory"), (tmp_path / "file" / "perf.md", "is a file, not a folder"),
                     (tmp_path / "perf.json", "would overwrite the report")):
    with pytest.raises(ValueError, match=match):
      report.write(out)
  (tmp_path / "perf.json").mkdir()
  with pytest.raises(ValueError, match="history.*is a directory"):
    report.write(tmp_path / "perf.md")


def test_hf_peer_of_a_tied_model_shares_its_embedding():
  """A dense model whose logits come from the embedding (logits_via_embedding, as in T5 1.0) has no output matrix
  of its own: nor has its peer, which would otherwise have a V x D matrix more to differentiate and update."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from repeat_lm.bench import hf
  from repeat_lm.models import info
  config = dataclasses.replace(tiny().module.config, logits_via_embedding=True)
  model = hf.peer_model(config)
  assert model.lm_head.weight is model.shared.weight
  assert sum(p.numel() for p in model.parameters()) == info.param_counts(config)["params_total"]


def test_step_time_is_the_median_round_and_mfu_is_against_the_best_probe(monkeypatch):
  """With the compiled step's rounds and the CPU probes scripted: the step time is the median round (not the mean),
  and the peak the best of the probe before the rounds and those beside them, as the peak's source says."""
  runs = iter([0.0] * 3 + [0.6, 0.2, 1.6])  # three warm-up steps, then 3 rounds of 2 steps: 0.3, 0.1, 0.8 s a step

  class FakeStep:
    compile_time_s = 1.0
    last_metrics = {"loss_sum": 6.0, "weight_sum": 3.0}

    def __init__(self, *args):
      del args

    def run(self, steps):
      del steps
      return next(runs)

  probes = iter([2e12, 1.5e12, 3e12])
  monkeypatch.setattr(bench_train, "JaxStep", FakeStep)
  monkeypatch.setattr(bench_train, "peak_memory_bytes", lambda: (1, "unchanging"))  # a three-step warm-up
  monkeypatch.setattr(flops, "peak_flops_total", lambda dtype: (1e12, "measured float32 matmul on 1 x cpu host(s)"))
  monkeypatch.setattr(flops, "reprobed_peak", lambda peak, dtype: max(peak, next(probes)))
  r = bench_train.run_benchmark(tiny(), dataclasses.replace(CFG, rounds=3))
  assert r["round_step_times_s"] == pytest.approx([0.3, 0.1, 0.8])
  assert (r["step_time_s"], r["step_time_min_s"], r["step_time_max_s"]) == pytest.approx((0.3, 0.1, 0.8))
  assert r["tokens_per_s"] == pytest.approx(8 * 40 / 0.3) and r["loss"] == 2.0
  assert r["peak_flops"] == 3e12
  assert r["peak_flops_source"].endswith(", the best of 4 probes (before and between the timed rounds)")
  # reference.md section 6: model FLOPs per step / (step time x peak).
  assert r["mfu"] == pytest.approx(8 * flops.train_flops_per_sequence(tiny().module.config, 32, 8) / (0.3 * 3e12))


def test_paired_speedup_is_the_median_of_hfs_time_over_ours_round_by_round():
  r = bench_train.paired_speedups([2.0, 1.0, 4.0], [3.0, 1.0, 12.0])
  assert r == {"speedup_vs_hf_by_round": [1.5, 1.0, 3.0], "speedup_vs_hf_paired": 1.5}


def _counting_run(memory_after_step: list[int]):
  """A stand-in step whose process peak memory after its n-th step is memory_after_step[n - 1]."""
  ran = []
  def run(steps):
    ran.extend([1] * steps)
    return 0.0
  return run, ran, lambda: memory_after_step[len(ran) - 1] if ran else 0


def test_warm_up_runs_until_three_steps_in_a_row_leave_the_peak_memory_unchanged():
  # Steps counted from 0, as in warm_up's docstring. float32: grows in steps 0-4, the jump in 4; steady in 5-7.
  run, ran, memory = _counting_run([10, 11, 12, 13, 20, 20, 20, 20, 21])
  assert bench_train.warm_up(run, 2, peak_memory=memory) == 8 == len(ran)
  # bfloat16: grows in steps 0 and 1, steady in 2 and 3, grows again in 4: that jump is warmed up too.
  run, ran, memory = _counting_run([10, 20, 20, 20, 30, 30, 30, 30, 31])
  assert bench_train.warm_up(run, 2, peak_memory=memory) == 8 == len(ran)


def test_warm_up_stops_at_its_limit_while_memory_still_grows():
  run, ran, memory = _counting_run(list(range(1, 100)))
  assert bench_train.warm_up(run, 2, limit=6, peak_memory=memory) == 6 == len(ran)


def test_warm_up_with_steady_memory_runs_the_minimum():
  run, ran, memory = _counting_run([5] * 10)
  assert bench_train.warm_up(run, 4, peak_memory=memory) == 4 == len(ran)
  run, ran, memory = _counting_run([5] * 10)
  # The first step grows the memory from nothing (the stand-in's 0); three steady steps follow it.
  assert bench_train.warm_up(run, 1, peak_memory=memory) == 4 == len(ran)
  run, ran, memory = _counting_run([5] * 10)
  assert bench_train.warm_up(run, 4, limit=2, peak_memory=memory) == 4 == len(ran)


def test_warm_up_of_zero_steps_runs_nothing():
  run, ran, memory = _counting_run([1, 2, 3])
  assert bench_train.warm_up(run, 0, peak_memory=memory) == 0 and not ran


def test_no_warm_up_is_a_valid_setting():
  assert bench_train.BenchConfig(warmup=0).warmup == 0
  with pytest.raises(ValueError, match="warmup=-1: must be >= 0"):
    bench_train.BenchConfig(warmup=-1)


def test_auto_dtype_is_float32_on_cpu():
  """The published CPU comparison is in float32 (with_dtype); a gin's bfloat16 takes --dtype=bfloat16."""
  bf16 = EncoderDecoderModel(module=Transformer(dataclasses.replace(tiny().module.config, dtype="bfloat16")))
  assert jax.devices()[0].platform == "cpu"
  assert bench_train.with_dtype(bf16, "auto").module.config.dtype == "float32"


def test_synthetic_batch_is_full_rows_with_the_targets_shifted_right_as_decoder_inputs():
  b = bench_train.synthetic_batch(CFG, vocab_size=4)
  assert b["encoder_input_tokens"].shape == (8, 32) and b["decoder_target_tokens"].shape == (8, 8)
  # No padding (0) and no EOS (1): every position is a token, as in a full unpacked row (ids 2 and 3 of 4 here).
  for key in ("encoder_input_tokens", "decoder_target_tokens"):
    assert set(np.unique(b[key])) == {2, 3}
  # seqio's EncDecFeatureConverter: the decoder reads the targets shifted right, from 0.
  np.testing.assert_array_equal(b["decoder_input_tokens"][:, 0], 0)
  np.testing.assert_array_equal(b["decoder_input_tokens"][:, 1:], b["decoder_target_tokens"][:, :-1])
  assert (b["decoder_loss_weights"] == 1).all()


def test_host_peak_memory_is_in_bytes():
  """getrusage's ru_maxrss is in KiB on Linux, as /proc's VmHWM (the same high-water mark) is."""
  memory, source = bench_train.peak_memory_bytes()
  status = "/proc/self/status"
  if source != "host peak RSS of the process" or not os.path.exists(status):
    pytest.skip("a device's own peak, or no /proc")
  with open(status, encoding="utf-8") as f:
    kib = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
  assert memory == pytest.approx(kib * 1024, rel=0.1)


def test_bench_says_which_run_settings_of_its_gins_it_does_not_use(caplog):
  # smoke.gin's DATA_PARALLEL=4 / MODEL_PARALLEL=2 (or a --gin.DATA_PARALLEL binding) were accepted and ignored: the
  # mesh came from the flags, 8 x 1, without a word.
  import argparse
  import gin
  from repeat_lm import cli, gin_utils
  args = argparse.Namespace(bench_command="train", data_parallel=-1, model_parallel=1, batch_size=16,
                            inputs_length=128, targets_length=32)
  gin.clear_config()
  try:
    gin_utils.configured_macro(["gin/models/t5_1_1_tiny.gin", "gin/runs/smoke.gin"], [], "MODEL")
    with caplog.at_level("WARNING"):
      cli._warn_of_unused_run_settings(args)  # noqa: SLF001
  finally:
    gin.clear_config()
  assert ("not the gin: DATA_PARALLEL=4 (bench uses --data_parallel=-1); MODEL_PARALLEL=2 (bench uses "
          "--model_parallel=1) are not used") in caplog.text
  assert "BATCH_SIZE" not in caplog.text and "TASK_FEATURE_LENGTHS" not in caplog.text  # the same as the flags'
