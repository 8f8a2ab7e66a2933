"""When a command starts jax.distributed: only when this process is one of several (launcher, srun step, TPU pod)."""

import logging
import time

import pytest

from repeat_lm.train import distributed

_VARS = ("JAX_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES",
         *distributed.SLURM_STEP_VARIABLES)


@pytest.fixture
def env(monkeypatch):
  for name in _VARS:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_single_process_by_default(env):
  assert not distributed.is_multiprocess_environment()


def test_explicit_process_count_wins(env):
  env.setenv("JAX_NUM_PROCESSES", "2")
  env.setenv("SLURM_NTASKS", "1")
  assert distributed.is_multiprocess_environment()
  env.setenv("JAX_NUM_PROCESSES", "1")
  env.setenv("SLURM_NTASKS", "4")
  assert not distributed.is_multiprocess_environment()


def test_slurm_allocation_shell_is_one_process(env):
  # `salloc -n 2` or a multi-task sbatch script running repeat-lm itself, outside srun: no peer will join.
  env.setenv("SLURM_JOB_ID", "5")
  env.setenv("SLURM_NTASKS", "2")
  assert not distributed.is_multiprocess_environment()


def test_srun_step_with_several_tasks_is_multiprocess(env):
  for name, value in zip(distributed.SLURM_STEP_VARIABLES, ("5", "node[1-2]", "2", "1", "0")):
    env.setenv(name, value)
  assert distributed.is_multiprocess_environment()
  env.setenv("SLURM_NTASKS", "1")
  assert not distributed.is_multiprocess_environment()


def test_tpu_pod_workers(env):
  env.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert distributed.is_multiprocess_environment()
  env.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1")
  assert not distributed.is_multiprocess_environment()


def test_launcher_variables_leave_every_gpu_of_an_srun_task_visible(env):
  """slurm.sbatch: one srun task per node drives all its GPUs. Left to detect, jax makes SLURM_LOCALID (0) the
  task's only visible GPU; the launcher's JAX_* variables say everything, so nothing is detected."""
  for name, value in zip(distributed.SLURM_STEP_VARIABLES, ("5", "node[1-2]", "2", "1", "0")):
    env.setenv(name, value)
  env.setenv("JAX_PROCESS_ID", "1")
  assert initialize_calls(env) == [{"coordinator_address": "node1:12355", "num_processes": 2, "process_id": 1,
                                    "cluster_detection_method": "deactivate"}]


def initialize_calls(env):
  """The arguments maybe_initialize gives jax.distributed.initialize, for a 2-process job coordinated by node1."""
  env.setenv("JAX_COORDINATOR_ADDRESS", "node1:12355")
  env.setenv("JAX_NUM_PROCESSES", "2")
  calls = recorded_initialize(env)
  distributed.maybe_initialize()
  return [kwargs for kwargs, _ in calls]


class _Exited(Exception):
  pass


def test_a_failed_process_of_a_multiprocess_job_exits_at_once(env, tmp_path):
  # A normal exit waits in jax.distributed's shutdown barrier (5 minutes) for the other processes, which wait for
  # this one in their next collective: a failure on one host was seen by no launcher for 5 minutes.
  import jax
  from repeat_lm import cli
  exits = []

  def fake_exit(code):
    exits.append(code)
    raise _Exited

  env.setattr(jax.distributed, "is_initialized", lambda: True)
  env.setattr(distributed.os, "_exit", fake_exit)
  with pytest.raises(_Exited):
    cli.main(["train", f"--gin_file={tmp_path / 'missing.gin'}"])
  assert exits == [2]
  distributed.exit_if_failed(0)  # success: the normal exit, which lets every process shut down together
  assert exits == [2]


def test_a_coordinator_without_a_process_id_leaves_the_rest_to_detection(env):
  assert initialize_calls(env) == [{"coordinator_address": "node1:12355", "num_processes": 2, "process_id": None,
                                    "cluster_detection_method": None}]


def test_an_empty_variable_counts_as_unset(env):
  # `export JAX_NUM_PROCESSES=` in a launch script: not a count (int('') would fail), so the other signs decide.
  env.setenv("JAX_NUM_PROCESSES", "")
  assert not distributed.is_multiprocess_environment()
  env.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert distributed.is_multiprocess_environment()


def recorded_initialize(env, effect=None) -> list:
  """jax.distributed.initialize replaced: records its arguments and, where given, what effect() returns (or raises)."""
  import jax
  calls = []
  env.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append((kwargs, effect() if effect else None)))
  env.setattr(jax.config, "update", lambda *args: None)
  return calls


def as_tpu_vm_worker(env, metadata: dict[str, str]) -> None:
  """This machine as a Cloud TPU VM: jax's flag (set at import where libtpu and TPU chips are found), no
  JAX_PLATFORMS, and a GCE metadata server answering `metadata`. jax's own cluster detection runs unchanged."""
  from jax._src import cloud_tpu_init
  from jax._src.clusters import cloud_tpu_cluster, cluster
  env.delenv("JAX_PLATFORMS", raising=False)
  env.delenv("TPU_SKIP_MDS_QUERY", raising=False)  # set by jax's import where it finds no TPU chip
  for module in (cloud_tpu_init, cloud_tpu_cluster, cluster):
    env.setattr(module, "running_in_cloud_tpu_vm", True)
  env.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata.get(key, ""), 200 if key in metadata else 404))


def jax_detection():
  from jax._src import clusters
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 5)


@pytest.mark.parametrize("worker,endpoints,expected", [
    ("1", "10.0.0.2,10.0.0.3", ("10.0.0.2:8482", 2, 1, None)),  # worker 1 of a 2-worker pod
    ("0", "10.0.0.2", ("10.0.0.2:8482", 1, 0, None))])  # a single-host VM: a job of one process
def test_a_tpu_vm_worker_joins_its_pod_from_the_metadata(env, worker, endpoints, expected):
  """`gcloud compute tpus tpu-vm ssh --worker=all --command='repeat-lm train ...'` (README's "the same command on
  every host") carries no TPU_WORKER_HOSTNAMES: jax.distributed never started, and every worker failed at Orbax's
  first use of it. On a TPU VM it starts, and jax's detection reads the workers from the metadata."""
  as_tpu_vm_worker(env, {"agent-worker-number": worker, "worker-network-endpoints": endpoints})
  calls = recorded_initialize(env, jax_detection)
  distributed.maybe_initialize()
  assert calls == [({"coordinator_address": None, "num_processes": None, "process_id": None,
                     "cluster_detection_method": None}, expected)]


def test_a_tpu_vm_whose_metadata_names_no_cluster_runs_as_one_process(env, caplog):
  as_tpu_vm_worker(env, {})

  def no_cluster():
    raise ValueError("coordinator_address should be defined.")  # jax, where its detection found nothing
  recorded_initialize(env, no_cluster)
  distributed.maybe_initialize()
  assert "metadata names no workers; running as a single process" in caplog.text


@pytest.mark.parametrize("setting", [{"JAX_PLATFORMS": "cpu"}, {"JAX_NUM_PROCESSES": "1"}])
def test_a_tpu_vm_told_to_run_alone_runs_alone(env, setting):
  as_tpu_vm_worker(env, {"agent-worker-number": "0", "worker-network-endpoints": "10.0.0.2"})
  for name, value in setting.items():
    env.setenv(name, value)
  calls = recorded_initialize(env)
  distributed.maybe_initialize()
  assert calls == []


def test_elsewhere_nothing_asks_the_metadata_server(env):
  """No TPU chip (this machine, a GPU box, a laptop with libtpu installed by mistake): jax's flag is False, and
  neither jax.distributed nor the GCE metadata server (which would wait on its timeouts there) is called."""
  from jax._src.clusters import cloud_tpu_cluster

  def metadata(key):
    raise AssertionError(f"asked the metadata server for {key}")
  env.setattr(cloud_tpu_cluster, "get_metadata", metadata)
  env.delenv("JAX_PLATFORMS", raising=False)
  calls = recorded_initialize(env)
  distributed.maybe_initialize()
  assert calls == [] and not distributed.on_cloud_tpu_vm()


def test_a_process_says_where_it_joins_before_it_waits(env, caplog):
  """Joining blocks until every process has: a misconfigured job logged nothing for 5 minutes, then a C++ abort."""
  caplog.set_level(logging.INFO)
  env.setenv("JAX_PROCESS_ID", "1")
  env.setenv("JAX_COORDINATOR_ADDRESS", "node1:61541")
  env.setenv("JAX_NUM_PROCESSES", "2")
  calls = recorded_initialize(env, lambda: caplog.text)  # the log as it was when jax was asked to join
  distributed.maybe_initialize()
  assert "jax.distributed: joining node1:61541 as process 1 of 2 (from JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID, " \
      "JAX_NUM_PROCESSES)" in calls[0][1]


def test_a_process_left_to_slurm_detection_says_what_jax_takes(env, caplog):
  caplog.set_level(logging.INFO)
  for name, value in zip(distributed.SLURM_STEP_VARIABLES, ("5", "node[1-2]", "2", "1", "0")):
    env.setenv(name, value)
  calls = recorded_initialize(env, lambda: caplog.text)
  distributed.maybe_initialize()
  assert "joining the coordinator as process 1 of 2 (from SLURM_PROCID, SLURM_NTASKS and SLURM_STEP_NODELIST's " \
      "first node)" in calls[0][1]


def test_a_process_still_waiting_to_join_says_what_to_check(env, caplog):
  env.setattr(distributed, "WAIT_HINT_S", 0.05)
  for name, value in (("JAX_COORDINATOR_ADDRESS", "node1:12355"), ("JAX_NUM_PROCESSES", "2"), ("JAX_PROCESS_ID", "1")):
    env.setenv(name, value)
  recorded_initialize(env, lambda: time.sleep(1))  # a peer that never comes
  distributed.maybe_initialize()
  assert "still waiting after 0 s for the other processes: check that every process of the job was started" in \
      caplog.text and "that node1:12355 is process 0's host and that every host reaches its port" in caplog.text


def test_a_process_that_joins_in_time_gives_no_hint(env, caplog):
  env.setattr(distributed, "WAIT_HINT_S", 0.2)
  env.setenv("JAX_PROCESS_ID", "1")
  initialize_calls(env)
  time.sleep(0.4)
  assert "still waiting" not in caplog.text


@pytest.mark.parametrize("setting,message", [
    ({}, "set JAX_COORDINATOR_ADDRESS (host:port of process 0) and JAX_PROCESS_ID (this process's rank, 0 to "
         "JAX_NUM_PROCESSES - 1), or start it where jax detects them"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "set JAX_PROCESS_ID (this process's rank"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_PROCESS_ID": "2"},
     "check JAX_COORDINATOR_ADDRESS=127.0.0.1:1, JAX_PROCESS_ID=2, JAX_NUM_PROCESSES=2"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_PROCESS_ID": "one"},
     "JAX_PROCESS_ID='one' is not a whole number: set it to this process's rank"),
    ({"JAX_COORDINATOR_ADDRESS": "node1", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS='node1' is not host:port of process 0"),
])
def test_a_misconfigured_process_names_the_variable_to_fix(env, capsys, tmp_path, setting, message):
  """jax's errors named its parameters (coordinator_address should be defined), an int() its literal, and an address
  without a port failed with an IndexError; each error now names the variable and the launchers that set it."""
  import jax
  from jax._src import distributed as jax_distributed
  for name in ("KUBERNETES_SERVICE_HOST", "OMPI_MCA_orte_hnp_uri"):  # nothing else for jax's detection to find
    env.delenv(name, raising=False)
  env.setattr(jax.config, "update", lambda *args: None)
  # jax's detection and checks, without the refusal of jax.distributed.initialize once this process has a backend.
  env.setattr(jax.distributed, "initialize", lambda **kwargs: jax_distributed.global_state.initialize(**kwargs))
  env.setenv("JAX_NUM_PROCESSES", "2")
  for name, value in setting.items():
    env.setenv(name, value)
  from repeat_lm import cli
  assert cli.main(["train", f"--gin_file={tmp_path / 'run.gin'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("repeat-lm: error: ValueError: ") and message in err
  assert "launch/slurm.sbatch and `repeat-lm launch-local` set them for each process" in err
