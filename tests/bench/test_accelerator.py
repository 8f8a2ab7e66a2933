"""`bench accelerator`: variant parsing, the sweep's bookkeeping (failures, deadline, 2x batch), the tables, and the
GPU trace attribution (CUDA-graph kernels named by their own fusion names)."""

import json

import jax
import pytest

from repeat_lm import cli
from repeat_lm.bench import accelerator, profile, report


def fake_result(variant: accelerator.Variant, step_time_s: float) -> dict:
  tokens = variant.batch_size * (512 + 114)
  return {"device": "1 x NVIDIA H200", "dtype": "bfloat16", "batch_size": variant.batch_size,
          "step_time_s": step_time_s, "step_time_min_s": step_time_s, "step_time_max_s": step_time_s,
          "tokens_per_s": tokens / step_time_s, "model_tflops_per_s": 100.0, "mfu": 0.1,
          "peak_memory_bytes": 2**30, "compile_time_s": 10.0, "peak_flops": 989e12,
          "peak_flops_source": "table: 1 x NVIDIA H200"}


def test_variant_parse_and_args():
  v = accelerator.Variant.parse("unrolled:minimal:cudnn:64")
  assert (v.scan, v.remat, v.attention, v.batch_size) == (False, "minimal", "cudnn", 64)
  assert v.name == "unrolled, remat minimal, cudnn attention, batch 64"
  args = v.args(steps=4, rounds=2)
  assert "--gin.SCAN_LAYERS=False" in args and "--gin.REMAT_POLICY='minimal'" in args
  assert "--gin.t5.T5Config.attention_implementation='cudnn'" in args and "--batch_size=64" in args
  assert "--gin.t5.T5Config.attention_padding_lengths=True" in args
  assert "--gin.t5.T5Config.attention_implementation=None" in accelerator.Variant.parse("scan:none:einsum:8").args(1, 1)
  masked = accelerator.Variant.parse("scan:minimal:cudnn-mask:128")
  assert (masked.attention, masked.padding_mask) == ("cudnn", True)
  assert masked.name == "scan, remat minimal, cudnn attention (padding mask), batch 128"
  assert "--gin.t5.T5Config.attention_padding_lengths=False" in masked.args(1, 1)
  for bad in ("scan:none:einsum", "scanned:none:einsum:8", "scan:none:flash:8", "scan:none:einsum:eight",
              "scan:none:einsum-mask:8", "scan:none:cudnn-bias:8", "scan:nonee:einsum:8", "scan:none:einsum:0",
              "scan:none:einsum:-8"):
    with pytest.raises(ValueError, match="expected 'scan|unrolled"):
      accelerator.Variant.parse(bad)


def test_sweep_records_failures_saves_each_result_and_repeats_the_fastest_at_twice_the_batch():
  times = {"scan, remat none, cudnn attention, batch 8": 0.3, "scan, remat minimal, einsum attention, batch 8": 0.2}
  saved = []

  def run(v):
    if v.name in times:
      return fake_result(v, times[v.name])
    if v.batch_size == 16:
      return fake_result(v, 0.35)
    raise RuntimeError("Out of memory while trying to allocate 117.33GiB with allocator GPU_0_bfc")

  results = accelerator.sweep(run, accelerator.base_variants(8), deadline=float("inf"),
                              save=lambda r: saved.append(len(r)))
  assert saved == list(range(1, len(accelerator.base_variants(8)) + 2))  # written after every variant
  assert [r["name"] for r in results][-1] == "scan, remat minimal, einsum attention, batch 16"
  assert accelerator.fastest(results)["name"] == "scan, remat minimal, einsum attention, batch 16"
  failed = [r for r in results if "error" in r]
  assert len(failed) == len(accelerator.base_variants(8)) - 2 and all("117.33GiB" in r["error"] for r in failed)


def test_sweep_starts_nothing_after_the_deadline():
  calls = []
  results = accelerator.sweep(lambda v: calls.append(v) or fake_result(v, 0.1), accelerator.base_variants(8),
                              deadline=0.0, save=lambda r: None)
  assert results == [] and calls == []


def test_markdown_has_every_row_failures_in_short_and_the_fastest():
  variants = accelerator.base_variants(128)
  results = [fake_result(variants[0], 0.3) | {"name": variants[0].name},
             fake_result(variants[1], 0.2) | {"name": variants[1].name},
             {"name": variants[2].name, "variant": {"batch_size": 128},
              "error": "W ... hlo_rematerialization\nrepeat-lm: error: JaxRuntimeError: RESOURCE_EXHAUSTED: Out of "
                       "memory while trying to allocate 117.33GiB with allocator GPU_0_bfc on device 0."},
             {"name": variants[3].name, "variant": {"batch_size": 128},
              "error": "bench --gin_file=x --batch_size=128 did not finish in 170 s"}]
  text = accelerator.to_markdown({"date": "2026-11-28", "model_gin": accelerator.MODEL_GIN, "steps": 10,
                                  "rounds": 3, "versions": {"jax": "0.11.2"}, "results": results})
  assert "Device: **1 x NVIDIA H200**" in text and "bfloat16 activations" in text
  assert f"| {variants[1].name} | 128 | 200.0 (200.0-200.0) | 400,640 |" in text
  assert "failed: out of memory (an allocation of 117.33GiB)" in text
  assert "failed: not finished within 170 s (compile included)" in text
  assert f"Fastest: **{variants[1].name}**" in text
  # The device machine's preinstalled jax is not the pinned one: the report says so (jax 0.11.2 against 0.10.2).
  assert f"These are not the versions the project pins (jax=={report.pinned_versions()['jax']})" in text


def test_pinned_versions_are_the_installed_package_s_pins():
  import tomllib
  from pathlib import Path
  deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
  expected = dict(d.split("==") for d in deps if d.split("==")[0] in ("jax", "jaxlib", "flax"))
  assert report.pinned_versions() == expected
  assert report.unpinned_note(expected) == ""


def test_cli_rerenders_from_json(tmp_path, capsys):
  v = accelerator.Variant.parse("scan:minimal:cudnn:128")
  m = {"date": "2026-11-28", "model_gin": accelerator.MODEL_GIN, "steps": 10, "rounds": 3, "versions": {},
       "results": [fake_result(v, 0.2) | {"name": v.name}]}
  (tmp_path / "in.json").write_text(json.dumps(m))
  cli.main(["bench", "accelerator", f"--from_json={tmp_path / 'in.json'}", f"--out={tmp_path / 'out.md'}"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fastest"] == v.name
  assert v.name in (tmp_path / "out.md").read_text()
  assert json.loads((tmp_path / "out.json").read_text())["results"][0]["name"] == v.name


def test_a_write_cut_short_keeps_the_rows_measured_before(tmp_path, monkeypatch):
  """measure rewrites OUT.json after every variant, so that a run cut short keeps what it measured: written in place,
  a kill mid-write left a cut JSON that lost every row, and check_out refused the next run over it."""
  v = accelerator.Variant.parse("scan:minimal:cudnn:128")
  m = {"date": "2026-11-28", "model_gin": accelerator.MODEL_GIN, "steps": 10, "rounds": 3, "versions": {},
       "results": [fake_result(v, 0.2) | {"name": v.name}]}
  out = tmp_path / "out.md"
  accelerator.write(m, out)

  def killed(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(accelerator.files.os, "replace", killed)  # killed before the new file is in place
  with pytest.raises(KeyboardInterrupt):
    accelerator.write({**m, "results": [*m["results"], *m["results"]]}, out)
  monkeypatch.undo()
  accelerator.check_out(out)
  assert accelerator.read_json(tmp_path / "out.json", "--previous") == m
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.md"]


GPU_TRACE = """
planes {
  name: "/device:GPU:0"
  lines {
    name: "Stream #14(Compute)"
    events { metadata_id: 1 duration_ps: 2000000000 stats { metadata_id: 9 str_value: "loop_fusion.3" } }
    events { metadata_id: 2 offset_ps: 1 duration_ps: 1000000000 stats { metadata_id: 9 str_value: "command_buffer_7" } }
    events { metadata_id: 3 offset_ps: 2 duration_ps: 3000000000 stats { metadata_id: 9 str_value: "command_buffer_7" } }
    events { metadata_id: 2 offset_ps: 3 duration_ps: 1000000000 stats { metadata_id: 9 str_value: "command_buffer_7" } }
  }
  event_metadata { key: 1 value { id: 1 name: "loop_fusion_3" } }
  event_metadata { key: 2 value { id: 2 name: "loop_add_fusion_12" } }
  event_metadata { key: 3 value { id: 3 name: "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT" } }
  stat_metadata { key: 9 value { id: 9 name: "hlo_op" } }
}
planes {
  name: "/host:CPU"
  lines { name: "python" events { metadata_id: 1 duration_ps: 9000000000 } }
  event_metadata { key: 1 value { id: 1 name: "PjitFunction(step_fn)" } }
}
"""


def test_gpu_trace_counts_device_kernels_and_names_those_in_cuda_graphs_by_their_fusion():
  seconds = profile.op_seconds(jax.profiler.ProfileData.from_text_proto(GPU_TRACE))
  assert dict(seconds) == pytest.approx({"loop_fusion.3": 2e-3, "loop_add_fusion.12": 2e-3,
                                         "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT": 3e-3})  # host launch not counted


def test_kernel_table_per_step(tmp_path):
  path = tmp_path / "step.xplane.pb"
  path.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(GPU_TRACE))
  table = accelerator.kernel_table(path, steps=2, variant="v")
  assert table["total_s"] == pytest.approx(3.5e-3)
  assert table["rows"][0] == {"kind": "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "seconds": pytest.approx(1.5e-3),
                              "ops": 1}


def test_launch_script_is_valid_bash_and_its_bench_flags_parse():
  import subprocess
  from pathlib import Path
  script = Path(__file__).resolve().parents[2] / "launch" / "accelerator_checks.sh"
  subprocess.run(["bash", "-n", str(script)], check=True)
  text = script.read_text()
  used = ["--out=o.md", "--time_budget_s=300", "--profile_xplane=s.pb"]
  assert all(flag.split("=")[0] in text for flag in used)
  args = cli.build_parser().parse_args(["bench", "accelerator", *used, "--variant=scan:minimal:cudnn:256"])
  assert (args.time_budget_s, args.profile_xplane, args.variant) == (300.0, "s.pb", ["scan:minimal:cudnn:256"])


def test_launch_script_exits_non_zero_when_the_gpu_tests_fail(tmp_path):
  import os
  import subprocess
  from pathlib import Path
  repo = Path(__file__).resolve().parents[2]
  # A python3 whose GPU tests fail and whose benchmark writes its report; no nvidia-smi needed (`|| true`).
  fake = tmp_path / "bin" / "python3"
  fake.parent.mkdir()
  fake.write_text("#!/usr/bin/env bash\n"
                  "case \" $* \" in\n"
                  "  *\" pytest \"*) echo '1 failed'; exit 1 ;;\n"
                  "  *\" bench accelerator \"*) for a; do [[ $a == --out=* ]] && echo report > \"${a#--out=}\"; done;"
                  " exit 0 ;;\n"
                  "esac\n")
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake))  # the interpreter the script runs, over the repository's .venv
  out = subprocess.run(["bash", str(repo / "launch" / "accelerator_checks.sh"), str(tmp_path / "out")], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 1, out.stdout + out.stderr
  assert (tmp_path / "out" / "performance_accelerator.md").read_text() == "report\n"  # the benchmark still ran


def test_launch_script_reports_no_trace_of_an_earlier_run_when_profiling_fails(tmp_path):
  """PROFILE=1 whose profiling run fails (out of memory, timeout): the trace an earlier run left in OUT_DIR was
  reported as this run's kernel table."""
  import os
  import subprocess
  from pathlib import Path
  repo = Path(__file__).resolve().parents[2]
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "step.xplane.pb").write_text("an earlier run's trace")
  fake = tmp_path / "bin" / "python3"
  fake.parent.mkdir()
  fake.write_text("#!/usr/bin/env bash\n"
                  "case \" $* \" in\n"
                  "  *\" bench train \"*) exit 1 ;;\n"
                  f"  *\" bench accelerator \"*) echo \"$*\" > {tmp_path / 'bench_args'};"
                  " for a; do [[ $a == --out=* ]] && echo report > \"${a#--out=}\"; done; exit 0 ;;\n"
                  "esac\n")
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake), PROFILE="1")
  out = subprocess.run(["bash", str(repo / "launch" / "accelerator_checks.sh"), str(tmp_path / "out")], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=60)
  assert "the profiling run failed (exit 1" in out.stderr
  assert "--profile_xplane" not in (tmp_path / "bench_args").read_text()
  assert not (tmp_path / "out" / "step.xplane.pb").exists()


def test_launch_script_runs_the_repositorys_venv_where_there_is_one(tmp_path):
  """A bare python3 beside an unactivated .venv (README's install) had no jax: every step failed."""
  import os
  import shutil
  import subprocess
  from pathlib import Path
  repo = Path(__file__).resolve().parents[2]
  (tmp_path / "launch").mkdir()
  shutil.copy(repo / "launch" / "accelerator_checks.sh", tmp_path / "launch")
  venv_python = tmp_path / ".venv" / "bin" / "python"
  venv_python.parent.mkdir(parents=True)
  venv_python.write_text("#!/usr/bin/env bash\necho \"venv python $*\" >> calls.txt\n")
  venv_python.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
  subprocess.run(["bash", "launch/accelerator_checks.sh", "out"], cwd=tmp_path, env=env, capture_output=True,
                 timeout=60)
  calls = (tmp_path / "calls.txt").read_text().splitlines()
  assert any("-m pytest" in c for c in calls) and any("bench accelerator" in c for c in calls), calls


def test_bad_json_inputs_name_the_flag_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="--previous=.*no such file; pass the .json"):
    accelerator.read_json(tmp_path / "missing.json", "--previous")
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="--from_json=.*is not JSON"):
    accelerator.read_json(tmp_path / "bad.json", "--from_json")
  (tmp_path / "other.json").write_text('{"train": []}')
  with pytest.raises(ValueError, match="no 'results' list"):
    accelerator.read_json(tmp_path / "other.json", "--from_json")
  (tmp_path / "binary.json").write_bytes(b"\xff\xfe{}")  # a UnicodeDecodeError that named neither flag nor file
  with pytest.raises(ValueError, match="--previous=.*binary.json is not JSON"):
    accelerator.read_json(tmp_path / "binary.json", "--previous")


def test_a_json_out_is_refused_before_measuring(tmp_path):
  # OUT is the Markdown report; its results go to OUT.json, which the report would overwrite were OUT that file.
  with pytest.raises(ValueError, match=r"names the Markdown report.*--out=.*perf\.md"):
    accelerator.check_out(tmp_path / "perf.json")
  assert not (tmp_path / "perf.json").exists()
  # A directory OUT failed at the first variant's save, which stopped the sweep after one variant.
  with pytest.raises(ValueError, match="is a directory"):
    accelerator.check_out(tmp_path)


def test_base_sweep_without_an_accelerator_plugin_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(accelerator.runtime, "accelerator_plugin_installed", lambda: False)
  with pytest.raises(RuntimeError, match="no JAX GPU/TPU plugin is installed.*--gin_file"):
    accelerator.measure(tmp_path / "out.md")
  assert not (tmp_path / "out.md").exists()


@pytest.mark.parametrize("kwargs,match", [({"steps": 0}, "--steps=0"), ({"rounds": -2}, "--rounds=-2"),
                                          ({"batch_size": 0}, "--batch_size=0"),
                                          ({"time_budget_s": 0}, "--time_budget_s=0"),
                                          ({"variant_timeout_s": -1}, "--variant_timeout_s=-1")])
def test_bad_sweep_settings_name_the_flag(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    accelerator.measure(tmp_path / "out.md", model_gin="gin/models/t5_1_1_tiny.gin", **kwargs)
  assert not (tmp_path / "out.md").exists()


def test_a_failed_variant_is_named_by_the_cause_not_the_hint_after_it():
  error = ("bench --gin_file=x failed:\n2026 INFO noise\nrepeat-lm: error: MODEL of the gin files ['x'] could not be "
           "built: ValueError: attention_implementation='cudnn' needs a GPU.\n  In call to configurable 'T5Config'\n"
           "Fix the binding it names (--gin.KEY=VALUE or the gin file).")
  assert "needs a GPU" in accelerator.short_error(error)
  assert accelerator.short_error("one line") == "one line"


def test_no_variant_starts_after_the_deadline_the_2x_batch_run_included(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(accelerator.time, "monotonic", lambda: clock[0])

  def run(v):
    clock[0] += 10.0  # each variant takes 10 s
    return fake_result(v, 0.1)

  variants = accelerator.base_variants(8)[:2]
  results = accelerator.sweep(run, variants, deadline=15.0, save=lambda r: None)
  # Both started before the deadline (at 0 and 10 s); at 20 s the fastest at twice the batch does not.
  assert [r["name"] for r in results] == [v.name for v in variants]


def test_measure_keeps_the_previous_rows_in_every_write(tmp_path, monkeypatch):
  old = accelerator.Variant.parse("scan:none:einsum:8")
  new = accelerator.Variant.parse("scan:minimal:cudnn:8")
  previous = [fake_result(old, 0.3) | {"name": old.name}]
  monkeypatch.setattr(accelerator.report, "run_bench", lambda args, timeout_s=None: fake_result(new, 0.2))
  m = accelerator.measure(tmp_path / "out.md", variants=[new], previous=previous,
                          model_gin="gin/models/t5_1_1_tiny.gin")
  written = json.loads((tmp_path / "out.json").read_text())
  assert [r["name"] for r in written["results"]] == [r["name"] for r in m["results"]] == [old.name, new.name]
  assert old.name in (tmp_path / "out.md").read_text()
