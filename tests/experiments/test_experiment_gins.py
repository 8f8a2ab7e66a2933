"""Every experiment gin: a header with its command and expected result, a CPU and a full-scale variant, a dry run
that expands to the expected runs, a self-contained gin per run (and fine-tuning stage) that parses on its own,
and a TRAIN_STEPS each run's task can feed."""

import io
import math
import os
import re
import subprocess
from pathlib import Path

import gin
import pytest

from experiment_helpers import tiny_experiment
from repeat_lm.data import denoisers, pipeline, tasks
from repeat_lm.experiments import compose, runner, status

GIN_DIR = Path(__file__).resolve().parents[2] / "gin" / "experiments"
EXPERIMENTS = sorted(p.stem for p in GIN_DIR.glob("*.gin"))
# Runs (fine-tuning stages) per experiment: the grids the docstrings of the gins describe.
EXPECTED = {
    "rq1_repetition": (5, 5), "rq1_repetition_cpu": (5, 0),
    "rq2_factors": (14, 14), "rq2_factors_cpu": (9, 0),
    "rq3_regularisation": (8, 0), "rq3_regularisation_cpu": (6, 0),
    "rq4_moe_proxy": (6, 0), "rq4_moe_proxy_cpu": (6, 0),
    "rq5_objectives": (4, 4), "rq5_objectives_cpu": (4, 0),
}


def test_every_research_question_has_a_cpu_and_a_full_scale_experiment():
  assert set(EXPERIMENTS) == set(EXPECTED)
  for name in EXPERIMENTS:
    assert (name[:-4] if name.endswith("_cpu") else name + "_cpu") in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_header_starts_with_the_command_and_the_expected_result(name):
  text = (GIN_DIR / f"{name}.gin").read_text()
  header = text[:text.index("from __gin__")]
  assert header.startswith("# ") and f"repeat-lm sweep --experiment=gin/experiments/{name}.gin" in header
  assert "Expect" in header and "PLACEHOLDER" not in header


def _batches_lower_bound(task: str, lengths: dict, batch_size: int, seed: int) -> float | None:
  """Batches a named repeated task holds: counted for the local corpus, else from its chunk length (UL2: the mean
  chunk, with a 0.5% margin: at full scale's 2^27+ tokens per epoch the count varies far less); None if unknown."""
  spec = tasks.parse_name(task)
  if not spec or not spec["unique_tokens"]:
    return None
  if spec["source"] == "wiki":  # cheap to count exactly, as the trainer will
    return pipeline.num_batches(pipeline.DatasetConfig(task, lengths, batch_size=batch_size, seed=seed))
  epochs = spec.get("epochs") or spec["total_tokens"] // spec["unique_tokens"]
  objective = tasks._resolve_objective(spec["objective"], spec["mode_tokens"], None)  # noqa: SLF001
  raw = [denoisers.raw_length(d, lengths["inputs"], lengths["targets"], 5 if d.mode else 0)
         for d in objective.denoisers]
  mean = sum(r * w for r, w in zip(raw, objective.rates)) / sum(objective.rates)
  per_epoch = math.ceil(spec["unique_tokens"] / mean) * (1.0 if len(raw) == 1 else 0.995)
  return per_epoch * epochs / batch_size


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_dry_run_expands_and_every_run_gin_parses_alone(name, tmp_path):
  out = io.StringIO()
  result = runner.run_sweep(f"gin/experiments/{name}.gin", tmp_path, runner.Options(dry_run=True, stream=out))
  runs, stages = EXPECTED[name]
  assert (result["runs"], result["stages"] - result["runs"]) == (runs, stages), out.getvalue()
  assert not result["failed"] and len(set(result["run_names"])) == runs
  assert out.getvalue().count("repeat-lm train --gin_file=") == runs
  for gin_path in sorted(tmp_path.glob("**/run.gin")):
    compose.check_parses(gin_path.read_text())
    assert gin.query_parameter("%MODEL_DIR") == str(gin_path.parent)
    assert "repeat_lm.experiments" not in gin_path.read_text()
    if gin_path.parent.name.startswith("ft_"):
      assert gin.query_parameter("%INITIAL_CHECKPOINT_PATH") == str(gin_path.parent.parent)
      continue
    steps, task = gin.query_parameter("%TRAIN_STEPS"), gin.query_parameter("%MIXTURE_OR_TASK_NAME")
    assert steps == status.train_steps(gin_path.read_text())
    if isinstance(task, str):
      bound = _batches_lower_bound(task, gin.query_parameter("%TASK_FEATURE_LENGTHS"),
                                   gin.query_parameter("%BATCH_SIZE"), gin.query_parameter("%RANDOM_SEED"))
      assert bound is None or steps <= bound, f"{gin_path}: {steps} steps but {task} holds ~{bound:.0f} batches"
    record = status.read(gin_path.parent)
    assert record["status"] == "pending" and record["values"]["model"]


def test_arms_that_swap_models_replace_the_experiments_include(tmp_path):
  runner.run_sweep("gin/experiments/rq2_factors.gin", tmp_path,
                   runner.Options(dry_run=True, only="xl_d27_e8,moe_large", stream=io.StringIO()))
  xl = (tmp_path / "xl_d27_e8" / "run.gin").read_text()
  assert re.search(r"^t5\.T5Config\.emb_dim = 2048$", xl, re.M)
  assert status.read(tmp_path / "moe_large")["values"]["model"] == "moe_large"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["moe_large", "xl_d27_e8"]


def test_a_runs_recorded_values_do_not_depend_on_the_runs_composed_before_it(tmp_path, fresh_gin):
  # The MoE arm composes first and leaves moe.MoeConfig registered with gin: the dense run recorded its 128 experts.
  exp = compose.load(tiny_experiment(tmp_path / "exp.gin", "[{'name': 'moe', 'model': 'gin/models/switch_tiny.gin', "
                                     "'moe.MoeConfig.num_experts': 2}, {'name': 'dense'}]"))
  varied = compose.varied_keys(exp.runs)
  values = {spec.name: compose.run_gin(exp, spec, str(tmp_path / spec.name), varied)[1] for spec in exp.runs}
  assert values["moe"]["moe.MoeConfig.num_experts"] == 2
  assert values["dense"]["moe.MoeConfig.num_experts"] is None  # no MoE: not MoeConfig's Python default
  assert compose.query("t5.T5Config.param_share") == "none"  # unbound parameters of a used configurable: defaults


def test_a_configurable_used_only_by_reference_reads_its_defaults(tmp_path, fresh_gin):
  # A model that refers to moe.MoeConfig() and leaves every setting at its default is an MoE model of 128 experts;
  # the reference is written 'moe.MoeConfig', the registered selector is 'repeat_lm.models.moe.MoeConfig'.
  model = tmp_path / "switch_defaults.gin"
  model.write_text(re.sub(r"^moe\.MoeConfig:\n(?:[ \t]+.*\n)+", "", Path("gin/models/switch_tiny.gin").read_text(),
                          flags=re.M))
  exp = compose.load(tiny_experiment(tmp_path / "exp.gin", f"[{{'name': 'moe', 'model': {str(model)!r}}}]"))
  spec = exp.runs[0]
  values = compose.run_gin(exp, spec, str(tmp_path / spec.name), ["moe.MoeConfig.num_experts"])[1]
  assert "moe.MoeConfig" not in model.read_text().replace("t5.T5Config.moe = @moe.MoeConfig()", "")
  assert values["moe.MoeConfig.num_experts"] == 128


def test_fine_tuning_stages_keep_the_layout_their_run_needed(tmp_path):
  # rq2_factors.gin's header: XL may need these on smaller slices; its SQuAD stage ran with finetune.gin's 1-device
  # defaults (and an unscanned model reading a scanned checkpoint).
  layout = ("MODEL_PARALLEL = 8", "SCAN_LAYERS = True", "REMAT_POLICY = 'minimal'")
  runner.run_sweep("gin/experiments/rq2_factors.gin", tmp_path,
                   runner.Options(dry_run=True, only="xl_d27_e8", stream=io.StringIO(), bindings=layout))
  stage = (tmp_path / "xl_d27_e8" / "ft_squad" / "run.gin").read_text()
  for line in layout:
    assert re.search(rf"^{re.escape(line)}$", stage, re.M), line
  assert re.search(r"^EXPERT_PARALLEL = 1$", stage, re.M)  # bound by pretrain.gin, carried as it is


@pytest.mark.parametrize("launcher,expected", [
    ("tpu-vm", "launch/tpu_vm.sh --tpu=my-pod --zone=us-central2-b train --gin_file="),
    ("slurm", "sbatch --job-name=d27_e8 --output="),
])
def test_remote_launchers_print_their_commands(launcher, expected, tmp_path):
  out = io.StringIO()
  runner.run_sweep("gin/experiments/rq1_repetition.gin", tmp_path, runner.Options(
      launcher=launcher, only="d27_e8", tpu="my-pod", zone="us-central2-b", stream=out))  # no --submit: print
  lines = [line for line in out.getvalue().splitlines() if "d27_e8" in line]
  assert len(lines) == 2 and expected in lines[0] and "finetune" in lines[1], out.getvalue()
  assert status.read(tmp_path / "d27_e8")["status"] == "pending"


def test_a_printed_tpu_vm_line_takes_the_tpu_and_zone_from_the_shell(tmp_path):
  """Without --tpu / --zone the printed line leaves them to the shell's $TPU_NAME / $ZONE: pasted, it reaches gcloud
  with their values (a stand-in gcloud records its arguments), not the literal words."""
  out = io.StringIO()
  runner.run_sweep("gin/experiments/rq1_repetition_cpu.gin", tmp_path / "root", runner.Options(
      launcher="tpu-vm", only="d19_e0", stream=out))
  [line] = [line for line in out.getvalue().splitlines() if "tpu_vm.sh" in line]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "gcloud.calls"}\n')
  (bin_dir / "gcloud").chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TPU_NAME": "my-pod", "ZONE": "us-central2-b"}
  subprocess.run(["bash", "-c", line.split("  #")[0]], env=env, check=True, capture_output=True)
  ssh = (tmp_path / "gcloud.calls").read_text().splitlines()[-1]
  assert ssh.startswith("compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all"), ssh


@pytest.mark.parametrize("launcher", ["tpu-vm", "slurm"])
def test_remote_launchers_need_the_launch_scripts(launcher, tmp_path, monkeypatch):
  monkeypatch.setattr(runner, "LAUNCH_DIR", tmp_path / "site-packages" / "launch")  # a wheel install: no launch/
  with pytest.raises(FileNotFoundError, match="come with a source checkout"):
    runner.run_sweep("gin/experiments/rq1_repetition.gin", tmp_path / "root", runner.Options(
        launcher=launcher, only="d27_e8", tpu="my-pod", zone="us-central2-b", stream=io.StringIO()))
  assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sbatch", "local_multiprocess.sh"])
def test_launch_scripts_are_valid_bash(script):
  path = GIN_DIR.parents[1] / "launch" / script
  assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
  assert os.access(path, os.X_OK)


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sbatch", "local_multiprocess.sh", "accelerator_checks.sh"])
def test_launch_scripts_expand_no_empty_array(script):
  """Under `set -u`, bash before 4.4 (macOS's /bin/bash is 3.2, where gcloud users run tpu_vm.sh) stops at "${A[@]}"
  of an empty array with `A[@]: unbound variable`: tpu_vm.sh without --project exited 1 before reaching gcloud."""
  text = (GIN_DIR.parents[1] / "launch" / script).read_text()
  for name in re.findall(r"^\s*(\w+)=\(\)", text, re.M):
    assert f'"${{{name}[@]}}"' not in text, f"{script}: {name} can be empty"


def test_slurm_submit_chains_fine_tuning_on_its_run(tmp_path, monkeypatch):
  # A stand-in sbatch that records its arguments and answers like SLURM.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch.calls\n'
                                  'echo "Submitted batch job $(wc -l < ' + f'{tmp_path}/sbatch.calls)"\n')
  (bin_dir / "sbatch").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  out = io.StringIO()
  root = tmp_path / "root"
  runner.run_sweep("gin/experiments/rq1_repetition.gin", root, runner.Options(
      launcher="slurm", submit=True, only="d27_e8", sbatch_args=["--nodes=4"], stream=out))
  calls = (tmp_path / "sbatch.calls").read_text().splitlines()
  assert calls[0].startswith("--job-name=d27_e8 --output=") and "--nodes=4" in calls[0]
  assert calls[0].endswith(f"launch/slurm.sbatch {root / 'd27_e8'} train")
  assert calls[1].startswith("--dependency=afterok:1 --job-name=d27_e8.ft_squad")
  assert status.read(root / "d27_e8")["job_id"] == "1" and status.read(root / "d27_e8")["status"] == "running"
  # Submitted runs are not submitted again.
  runner.run_sweep("gin/experiments/rq1_repetition.gin", root, runner.Options(
      launcher="slurm", submit=True, only="d27_e8", stream=out))
  assert len((tmp_path / "sbatch.calls").read_text().splitlines()) == 2


def _stand_in_sbatch(tmp_path: Path) -> Path:
  """A stand-in sbatch that records its arguments in $SBATCH_CALLS and answers like SLURM; returns its folder."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$@" >> "$SBATCH_CALLS"\n'
                                  'echo "Submitted batch job $(wc -l < "$SBATCH_CALLS")"\n')
  (bin_dir / "sbatch").chmod(0o755)
  return bin_dir


def test_slurm_jobs_run_the_sweeps_repository_from_any_directory(tmp_path, monkeypatch):
  """The batch script defaults REPO_DIR to the submit directory: a sweep started elsewhere (an absolute --experiment)
  submitted jobs that could not find repeat-lm. Printed and submitted lines name the repository the sweep runs from."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("PATH", f"{_stand_in_sbatch(tmp_path)}:{os.environ['PATH']}")
  monkeypatch.setenv("SBATCH_CALLS", str(tmp_path / "sbatch.calls"))
  experiment, out = str(GIN_DIR / "rq1_repetition.gin"), io.StringIO()
  runner.run_sweep(experiment, tmp_path / "root", runner.Options(launcher="slurm", only="d27_e8", stream=out))
  runner.run_sweep(experiment, tmp_path / "root", runner.Options(launcher="slurm", submit=True, only="d27_e8",
                                                                  stream=io.StringIO()))
  export = f"--export=ALL,REPO_DIR={GIN_DIR.parents[1]}"
  printed = [line for line in out.getvalue().splitlines() if line.startswith("sbatch")]
  calls = (tmp_path / "sbatch.calls").read_text().splitlines()
  assert len(printed) == len(calls) == 2
  for line, call in zip(printed, calls):
    assert f" {export} " in line and f" {export} " in call
    assert f" {GIN_DIR.parents[1] / 'launch' / 'slurm.sbatch'} {tmp_path / 'root' / 'd27_e8'}" in call


def test_a_printed_slurm_plan_chains_fine_tuning_like_submit(tmp_path, monkeypatch):
  """Pasted, the printed plan submits what --submit does, fine-tuning chained on its run's job (afterok): the job id
  comes from a variable the shell refuses to leave empty, so no stage starts alongside its pre-training."""
  bin_dir = _stand_in_sbatch(tmp_path)
  experiment, out = str(GIN_DIR / "rq1_repetition.gin"), io.StringIO()
  runner.run_sweep(experiment, tmp_path / "root", runner.Options(
      launcher="slurm", dry_run=True, only="d27_e8", sbatch_args=["--nodes=4"], stream=out))
  train, finetune = [line.split("  #")[0] for line in out.getvalue().splitlines() if line.startswith("sbatch")]
  assert 'sbatch --dependency=afterok:"${JOB_d27_e8:?' in finetune
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_CALLS": str(tmp_path / "plan.calls")}
  env.pop("JOB_d27_e8", None)
  refused = subprocess.run(["bash", "-c", finetune], env=env, capture_output=True, text=True)
  assert refused.returncode != 0 and "JOB_d27_e8" in refused.stderr and not (tmp_path / "plan.calls").exists()
  job = subprocess.run(["bash", "-c", train], env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
  subprocess.run(["bash", "-c", finetune], env={**env, "JOB_d27_e8": job}, check=True, capture_output=True)
  # --submit, with its own record of the calls: the same arguments.
  monkeypatch.setenv("PATH", env["PATH"])
  monkeypatch.setenv("SBATCH_CALLS", str(tmp_path / "submit.calls"))
  runner.run_sweep(experiment, tmp_path / "root", runner.Options(
      launcher="slurm", submit=True, only="d27_e8", sbatch_args=["--nodes=4"], stream=io.StringIO()))
  assert (tmp_path / "plan.calls").read_text() == (tmp_path / "submit.calls").read_text()
  assert (tmp_path / "plan.calls").read_text().splitlines()[1].startswith("--dependency=afterok:1 --job-name=d27_e8.")
  # Once its run is submitted, the printed stage waits for that job.
  out = io.StringIO()
  runner.run_sweep(experiment, tmp_path / "root", runner.Options(launcher="slurm", only="d27_e8", stream=out))
  assert "sbatch --dependency=afterok:1 --job-name=d27_e8.ft_squad" in out.getvalue()


def test_docs_sweep_example_dry_runs(tmp_path):
  """docs/experiments.md's "Expressing a sweep in gin" block, as written (its '...' line left out)."""
  doc = (GIN_DIR.parents[1] / "docs" / "experiments.md").read_text()
  block = doc.split("## Expressing a sweep in gin", 1)[1].split("```\n", 2)[1]
  experiment = tmp_path / "example.gin"
  experiment.write_text("\n".join(line for line in block.splitlines() if line.strip() != "..."))
  out = runner.run_sweep(str(experiment), tmp_path / "root", runner.Options(dry_run=True, stream=io.StringIO()))
  assert sorted(p.name for p in (tmp_path / "root").iterdir()) == sorted([
      "base_d27_e8", "base_d29_e6", "large_d27_e8", "large_d29_e6", "reg_none", "reg_dropout0.1", "reg_staged"])
  assert out["runs"] == 7


def test_a_resolved_best_value_and_a_stages_own_bindings_reach_the_gins(tmp_path, fresh_gin):
  """A sweep.Best that the finished runs resolved is written as their value, not as its default; a fine-tuning
  stage's own bindings come after the model settings it inherits, so they win (as sweep.Finetune states)."""
  exp = compose.load(tiny_experiment(
      tmp_path / "exp.gin", "[{'name': 'a', 't5.T5Config.dropout_rate': 0.0}, "
      "{'name': 'b', 'DROPOUT_RATE': @sweep.Best()}]",
      "sweep.Best.runs = 'a'\nsweep.Best.column = 'DROPOUT_RATE'\nsweep.Best.default = 0.5\n"
      "sweep.Grid.finetune = [@sweep.Finetune()]\nsweep.Finetune.name = 'ft'\n"
      "sweep.Finetune.bindings = {'t5.T5Config.dropout_rate': 0.1}"))
  a, b = exp.runs
  text, values = compose.run_gin(exp, b, str(tmp_path / "b"), compose.varied_keys(exp.runs), {"DROPOUT_RATE": 0.3})
  assert re.search(r"^DROPOUT_RATE = 0\.3$", text, re.M) and values["DROPOUT_RATE"] == 0.3
  pretrain, _ = compose.run_gin(exp, a, str(tmp_path / "a"), compose.varied_keys(exp.runs))
  assert re.search(r"^t5\.T5Config\.dropout_rate = 0\.0$", pretrain, re.M)
  stage = compose.finetune_gin(exp, a, a.finetune[0], pretrain, str(tmp_path / "a" / "ft_ft"))
  assert re.search(r"^t5\.T5Config\.dropout_rate = 0\.1$", stage, re.M)


def test_command_line_bindings_win_over_a_runs_own(tmp_path, fresh_gin):
  # `repeat-lm sweep --gin.TRAIN_STEPS=2`: bindings apply to every run after the experiment's (cli.py, runner.Options),
  # an arm's TRAIN_STEPS=5 included: the quick check trains 2 steps, not 5.
  exp = tiny_experiment(tmp_path / "exp.gin", "[{'name': 'a', 'TRAIN_STEPS': 5}]")
  opts = runner.Options(dry_run=True, stream=io.StringIO(), bindings=["TRAIN_STEPS=2"])
  runner.run_sweep(exp, tmp_path / "root", opts)
  assert status.last_step(tmp_path / "root" / "a") == 2
