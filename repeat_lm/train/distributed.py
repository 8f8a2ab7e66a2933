"""Multi-host start-up: initialise `jax.distributed` when the job has several processes, and on a Cloud TPU VM."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

# What each variable holds, and who sets them, for the errors that name a missing or wrong one.
VARIABLES = {
    "JAX_COORDINATOR_ADDRESS": "host:port of process 0",
    "JAX_NUM_PROCESSES": "the number of processes",
    "JAX_PROCESS_ID": "this process's rank, 0 to JAX_NUM_PROCESSES - 1",
}
SET_BY = "launch/slurm.sbatch and `repeat-lm launch-local` set them for each process"

# Seconds a process waits to join before it says what to check. jax's own timeout is 5 minutes, after which it aborts
# with a C++ error about the distributed service that names neither the coordinator nor the missing host.
WAIT_HINT_S = 60.0


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not a whole number: set it to {VARIABLES[name]} ({SET_BY}).") from None


# What jax's SLURM cluster detection needs: the variables of an srun step. SLURM_NTASKS alone is also set in a job's
# batch shell and in an salloc shell, where this process is the only one and no peer will ever join.
SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _in_srun_step() -> bool:
  return all(os.environ.get(name) for name in SLURM_STEP_VARIABLES)


def is_multiprocess_environment() -> bool:
  """True when a launcher started several processes (our launchers, an srun step, or a multi-worker TPU VM slice)."""
  num = _env_int("JAX_NUM_PROCESSES")
  if num is not None:
    return num > 1
  if _in_srun_step():
    return int(os.environ["SLURM_NTASKS"]) > 1
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM whose TPUs this process is to use.

  jax answers "Cloud TPU VM" when it is imported, from libtpu being installed and TPU chips on the PCI bus
  (jax/_src/cloud_tpu_init.py), the flag its own TPU cluster detection reads: no network, so a machine without TPU
  chips (a GPU box, a laptop with libtpu installed by mistake, these tests) is none, and nothing waits for the GCE
  metadata server there. JAX_PLATFORMS without tpu (a CPU run on a TPU VM) is none either.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  from jax._src import cloud_tpu_init
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def maybe_initialize() -> None:
  """Call before any other JAX use. Explicit JAX_* variables win; jax detects the rest (SLURM, TPU VM)."""
  from_tpu_metadata = False
  if not is_multiprocess_environment():
    # A TPU VM pod's workers are in the VM's metadata, not in the environment of the ssh session that started this
    # process (`gcloud compute tpus tpu-vm ssh --worker=all --command=...`, as T5X and MaxText run): without
    # jax.distributed every worker failed at its first cross-host use (Orbax's checkpointer). So on a TPU VM it always
    # starts and jax reads the workers from the metadata, as MaxText has it: a single-host VM is a job of one
    # process. An explicit JAX_NUM_PROCESSES (1) says there is nothing to join.
    if _env_int("JAX_NUM_PROCESSES") is not None or not on_cloud_tpu_vm():
      return
    from_tpu_metadata = True
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
  if coordinator is not None and not re.fullmatch(r".+:\d+", coordinator):  # jax failed on it with an IndexError
    raise ValueError(f"JAX_COORDINATOR_ADDRESS={coordinator!r} is not {VARIABLES['JAX_COORDINATOR_ADDRESS']} "
                     f"({SET_BY}).")
  given = {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_PROCESS_ID": _env_int("JAX_PROCESS_ID"),
           "JAX_NUM_PROCESSES": _env_int("JAX_NUM_PROCESSES")}
  # Said before joining, which blocks until every process has: a misconfigured job showed nothing for 5 minutes.
  logging.info("jax.distributed: joining %s", _joining(given, from_tpu_metadata))
  import jax
  # CPU processes all-reduce through a collectives library; without one, a cross-process computation fails. gloo
  # ships in jaxlib (the default in 0.10, explicit so no other default can break CPU launches); TPU/GPU ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  hint = _wait_hint(coordinator)
  try:
    # With all three given, nothing is left to detect. Detection would also make up the visible devices: inside an
    # srun step jax takes SLURM_LOCALID as this process's only GPU (one process per GPU), so slurm.sbatch's one
    # process per node would drive GPU 0 alone. JAX_LOCAL_DEVICE_IDS still restricts them where that is wanted
    # (slurm.sbatch sets it when a node runs one process per GPU).
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=given["JAX_NUM_PROCESSES"],
                               process_id=given["JAX_PROCESS_ID"],
                               cluster_detection_method=None if None in given.values() else "deactivate")
  except ValueError as e:
    if from_tpu_metadata:
      # jax found no TPU cluster in the metadata (a TPU VM outside GCE's TPU API, e.g. a GKE node without
      # TPU_WORKER_HOSTNAMES), and started nothing: one process, as before.
      logging.warning("jax.distributed: this TPU VM's metadata names no workers; running as a single process")
      return
    # jax's own message names its parameters (coordinator_address, process_id), not the variables to set.
    missing = [f"{name} ({VARIABLES[name]})" for name, value in given.items() if value is None]
    fix = (f"set {' and '.join(missing)}, or start it where jax detects them (an srun step, a TPU VM)" if missing
           else "check " + ", ".join(f"{name}={value}" for name, value in given.items()) +
           f" (JAX_PROCESS_ID is {VARIABLES['JAX_PROCESS_ID']})")
    raise ValueError(f"jax.distributed could not start ({e}): {fix}; {SET_BY}.") from e
  finally:
    hint.cancel()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _joining(given: dict[str, str | int | None], from_tpu_metadata: bool) -> str:
  """'COORDINATOR as process I of N (where they come from)', with what jax will detect as far as it is known."""
  sources = [name for name, value in given.items() if value is not None]
  origin = f"from {', '.join(sources)}" if sources else ""
  process_id, count = given["JAX_PROCESS_ID"], given["JAX_NUM_PROCESSES"]
  if len(sources) < len(given):
    srun = _in_srun_step()
    if srun:  # what jax's SLURM detection takes
      process_id = os.environ["SLURM_PROCID"] if process_id is None else process_id
      count = os.environ["SLURM_NTASKS"] if count is None else count
    origin += ("; the rest " if sources else "") + (
        "from SLURM_PROCID, SLURM_NTASKS and SLURM_STEP_NODELIST's first node" if srun else
        "from the TPU VM's metadata" if from_tpu_metadata or os.environ.get("TPU_WORKER_HOSTNAMES") else
        "left to jax's cluster detection")
  return (f"{given['JAX_COORDINATOR_ADDRESS'] or 'the coordinator'} as process "
          f"{'?' if process_id is None else process_id} of {'?' if count is None else count} ({origin})")


def _wait_hint(coordinator: str | None) -> threading.Timer:
  """A started timer that says what to check if joining takes WAIT_HINT_S; cancel it once joined."""
  reach = (f"that {coordinator} is process 0's host and that every host reaches its port" if coordinator else
           "that every host reaches process 0's host on the coordinator's port")
  hint = threading.Timer(WAIT_HINT_S, logging.warning, args=(
      "jax.distributed: still waiting after %.0f s for the other processes: check that every process of the job was "
      "started (one that failed to start leaves the others waiting until jax gives up, 5 minutes in) and %s",
      WAIT_HINT_S, reach))
  hint.daemon = True
  hint.start()
  return hint


def initialized() -> bool:
  """Whether jax.distributed is running: this process is one of a multi-process job (or a TPU VM's only one)."""
  if "jax" not in sys.modules:  # no command that starts it has run: nothing to import for the answer
    return False
  import jax
  return jax.distributed.is_initialized()


def exit_if_failed(code: int) -> None:
  """End this process now with `code` if it failed (non-zero) as one process of a multi-process job.

  Exiting normally, jax waits in a shutdown barrier for every other process (jax.distributed's
  shutdown_timeout_seconds, 5 minutes). A process that failed alone (a host's unreadable data, a full disk) waited
  there while its peers waited for it in their next collective: for 5 minutes nobody saw the failure, neither
  launch-local nor `srun --kill-on-bad-exit`, whose whole point is to stop the others when one fails.
  """
  if not code or not initialized():
    return
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)
