"""launch/slurm.sbatch run by bash with stand-ins for srun, scontrol and repeat-lm: what each task is started with,
what the job records and how it exits."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch"

# Records its arguments and the jax.distributed variables of its task in $CALLS; answers run-status as cli.main
# prints it ($ANSWER), or refuses it ($REFUSE); a trainer exits $TRAIN_CODE, or with $PIDS set writes its pid there
# and trains until SIGTERM, then exits 0 as a trainer that saved its checkpoint does.
REPEAT_LM = """#!/bin/bash
echo "$* | coord=${JAX_COORDINATOR_ADDRESS-unset} n=${JAX_NUM_PROCESSES-unset} id=${JAX_PROCESS_ID-unset}" \
  "gpus=${JAX_LOCAL_DEVICE_IDS-all}" >> "$CALLS"
case "$1" in
  run-status) [ -z "${REFUSE:-}" ] || { echo "repeat-lm: error: $REFUSE" >&2; exit 2; }
              echo "$ANSWER" ;;
  *) if [ -n "${PIDS:-}" ]; then
       trap 'kill $!; echo "trainer $JAX_PROCESS_ID: SIGTERM" >> "$CALLS"; exit 0' TERM
       sleep 60 & echo $$ >> "$PIDS"; wait
     fi
     exit "${TRAIN_CODE:-0}" ;;
esac
"""
# Drops its own options and runs the command once per task: $NODES nodes of $TASKS_PER_NODE tasks.
SRUN = """#!/bin/bash
while [ "${1#--}" != "$1" ]; do shift; done
nodes=${NODES:-1} per=${TASKS_PER_NODE:-1} pids=() rc=0
for ((n = 0; n < nodes; n++)); do
  for ((l = 0; l < per; l++)); do
    SLURM_PROCID=$((n * per + l)) SLURM_LOCALID=$l SLURM_STEP_NUM_NODES=$nodes SLURM_STEP_NUM_TASKS=$((nodes * per)) \\
      "$@" & pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && for ((n = 1; n <= ${NODES:-1}; n++)); do echo "node$n"; done
"""


def job(tmp_path: Path, nodes: int = 2, recorded: str = "finished", **env: str) -> dict[str, str]:
  """The environment of a batch job of `nodes` nodes (one task each) whose stand-ins live in tmp_path."""
  repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
  for d in (repo / ".venv" / "bin", bin_dir, tmp_path / "run"):
    d.mkdir(parents=True, exist_ok=True)
  (tmp_path / "run" / "run.gin").touch()
  for path, body in {repo / ".venv" / "bin" / "repeat-lm": REPEAT_LM, bin_dir / "srun": SRUN,
                     bin_dir / "scontrol": SCONTROL}.items():
    path.write_text(body)
    path.chmod(0o755)
  return {"PATH": f"{bin_dir}:/usr/bin:/bin", "REPO_DIR": str(repo), "CALLS": str(tmp_path / "calls"),
          "ANSWER": json.dumps({"error": None, "status": recorded}, sort_keys=True),
          "NODES": str(nodes), "SLURM_JOB_ID": "101", "SLURM_JOB_NODELIST": f"node[1-{nodes}]",
          "SLURM_NTASKS": str(nodes), **env}


def sbatch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, check=False,
                        timeout=60)


def calls(env: dict[str, str]) -> list[str]:
  path = Path(env["CALLS"])
  return path.read_text().splitlines() if path.exists() else []


def trainers(env: dict[str, str]) -> list[str]:
  return sorted(line for line in calls(env) if not line.startswith("run-status"))


def test_a_slurm_job_without_the_repository_says_so(tmp_path):
  """REPO_DIR without .venv/bin/repeat-lm: the job cannot record its exit (run-status), so it names REPO_DIR in the
  job's log and the run's train.log and fails, instead of two bare 'No such file or directory'."""
  env = {**job(tmp_path), "REPO_DIR": str(tmp_path / "elsewhere")}
  out = sbatch(env, str(tmp_path / "run"), "train")
  assert out.returncode == 127
  assert f"REPO_DIR={tmp_path / 'elsewhere'} must be the repository checkout holding .venv" in out.stderr
  assert "REPO_DIR=" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("recorded,trainer_code,job_code", [("pending", 0, 75), ("finished", 0, 0), ("failed", 3, 3)])
def test_a_slurm_job_stopped_before_its_last_step_is_not_a_success(tmp_path, recorded, trainer_code, job_code):
  """Fine-tuning is chained on the job with afterok: a trainer that checkpointed at SIGTERM and exited 0 must not
  let it start from the unfinished run."""
  env = job(tmp_path, nodes=1, recorded=recorded, TRAIN_CODE=str(trainer_code))
  out = sbatch(env, str(tmp_path / "run"), "train")
  assert out.returncode == job_code, out.stderr


def test_a_slurm_job_whose_run_is_refused_trains_nowhere(tmp_path):
  """run-status --started refuses a directory without run.gin, or another attempt of a finished run: the refusal was
  printed and srun started the trainer on every node anyway."""
  env = job(tmp_path, REFUSE="holds no run.gin")
  (tmp_path / "run" / "run.gin").unlink()
  out = sbatch(env, str(tmp_path / "run"), "train")
  assert out.returncode == 2 and "holds no run.gin" in out.stderr and not trainers(env)


def test_every_task_gets_the_coordinator_its_count_and_its_rank(tmp_path):
  env = job(tmp_path)
  assert sbatch(env, str(tmp_path / "run"), "train").returncode == 0
  gin = tmp_path / "run" / "run.gin"
  assert trainers(env) == [f"train --gin_file={gin} | coord=node1:61541 n=2 id={i} gpus=all" for i in (0, 1)]


def test_each_job_coordinates_on_its_own_port(tmp_path):
  """A fixed port (12355) let a job whose first node was the same machine join this job's coordination service, which
  aborted both ("unexpectedly tried to connect with a different incarnation"). The port comes from the job id, as in
  jax's own SLURM detection, so a requeued job keeps it; JAX_PORT still chooses one."""
  ports = []
  for job_id, port in (("101", None), ("202", None), ("101", "23456")):
    env = job(tmp_path, SLURM_JOB_ID=job_id, **({"JAX_PORT": port} if port else {}))
    Path(env["CALLS"]).unlink(missing_ok=True)
    assert sbatch(env, str(tmp_path / "run"), "train").returncode == 0
    [coordinator] = {line.split("coord=")[1].split()[0] for line in trainers(env)}
    ports.append(coordinator)
  assert ports == ["node1:61541", "node1:61642", "node1:23456"]


@pytest.mark.parametrize("scontrol", ["exit 1", "", None])
def test_a_job_without_its_first_node_starts_nothing(tmp_path, scontrol):
  """scontrol failing, printing nothing, or missing from PATH (a container image): the coordinator was ':12355' and
  every task waited 5 minutes for it before aborting."""
  env = job(tmp_path)
  stand_in = tmp_path / "bin" / "scontrol"
  if scontrol is None:
    stand_in.unlink()
  else:
    stand_in.write_text(f"#!/bin/bash\n{scontrol}\n")
  out = sbatch(env, str(tmp_path / "run"), "train")
  assert out.returncode == 2 and "no coordinator: `scontrol show hostnames node[1-2]` printed no node" in out.stderr
  assert calls(env) == []  # not even recorded as started


def test_a_job_stopped_by_slurm_records_its_trainers_exit(tmp_path):
  """At the time limit and on preemption SLURM sends SIGTERM to the batch shell as well as the trainers. The shell
  died at once (exit 143): the trainers' exit was never recorded, and the job never exited 75."""
  env = job(tmp_path, recorded="pending", PIDS=str(tmp_path / "pids"))
  proc = subprocess.Popen(["bash", str(SCRIPT), str(tmp_path / "run"), "train"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 30
  while len(pids := (tmp_path / "pids").read_text().split() if (tmp_path / "pids").exists() else []) < 2:
    assert time.monotonic() < deadline and proc.poll() is None, "the trainers did not start"
    time.sleep(0.05)
  for pid in (proc.pid, *map(int, pids)):  # as SLURM does: every process of the job
    os.kill(pid, signal.SIGTERM)
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 75, err
  assert "waiting for the trainers to checkpoint" in err and json.loads(out)["status"] == "pending"
  run = tmp_path / "run"
  assert calls(env)[-1] == f"run-status --run_dir={run} --exit_code=0 --log={run / 'train.log'} | " \
      "coord=node1:61541 n=2 id=unset gpus=all"


def test_the_batch_directives_warn_the_trainers_early_and_keep_the_log():
  # sbatch reads #SBATCH lines only up to the script's first command.
  lines = SCRIPT.read_text().splitlines()[1:]
  header = lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]
  directives = [line.split()[1] for line in header if line.startswith("#SBATCH")]
  assert len(directives) == sum(line.startswith("#SBATCH") for line in lines)
  assert "--open-mode=append" in directives  # a requeue keeps the job id, so the log's name
  [early] = [d for d in directives if d.startswith("--signal=")]
  assert re.fullmatch(r"--signal=TERM@\d+", early) and int(early.split("@")[1]) >= 300  # the steps, not B: the shell


@pytest.mark.parametrize("visible,gpus", [(None, ["0", "1", "2", "3"]), ("0,1,2,3", ["0", "1", "2", "3"]),
                                          ("2", ["all"] * 4)])
def test_one_process_per_gpu_takes_the_gpu_of_its_local_rank(tmp_path, visible, gpus):
  """--ntasks-per-node=4: each process drove all 4 GPUs (the launcher's JAX_* variables turn jax's detection off), so
  4 processes preallocated memory on every GPU. Each now takes the GPU of its local rank, as jax's SLURM detection
  would, unless SLURM bound one GPU to each task (CUDA_VISIBLE_DEVICES names only it)."""
  env = job(tmp_path, SLURM_NTASKS="8", TASKS_PER_NODE="4", **({"CUDA_VISIBLE_DEVICES": visible} if visible else {}))
  assert sbatch(env, str(tmp_path / "run"), "train").returncode == 0
  assert all(" n=8 " in line for line in trainers(env))
  by_rank = {int(line.split(" id=")[1].split()[0]): line.split("gpus=")[1] for line in trainers(env)}
  assert [by_rank[rank] for rank in range(8)] == gpus * 2  # ranks 0-3 on node 1, 4-7 on node 2


def test_one_process_per_node_drives_all_its_gpus(tmp_path):
  env = job(tmp_path, CUDA_VISIBLE_DEVICES="0,1,2,3")
  assert sbatch(env, str(tmp_path / "run"), "train").returncode == 0
  assert [line.split("gpus=")[1] for line in trainers(env)] == ["all", "all"]


@pytest.mark.parametrize("args", [["RUN", "train", "--gin.TRAIN_STEPS=10"], []])
def test_a_job_refuses_arguments_it_would_not_use(tmp_path, args):
  """Gin settings after the verb were dropped without a word: the job trained with other settings than the ones
  typed. They belong in run.gin, which is what status.json and collect describe the run by."""
  env = job(tmp_path)
  out = sbatch(env, *[str(tmp_path / "run") if a == "RUN" else a for a in args])
  assert out.returncode == 2 and f"takes RUN_DIR [VERB], got {len(args)} arguments" in out.stderr
  assert "put gin settings in RUN_DIR/run.gin" in out.stderr and calls(env) == []
