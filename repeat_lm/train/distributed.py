"""Multi-host start-up: initialise `jax.distributed` when the job has several processes."""

from __future__ import annotations

import logging
import os
import sys


def _env_int(*names: str) -> int | None:
  for name in names:
    if os.environ.get(name):
      return int(os.environ[name])
  return None


# What jax's SLURM cluster detection needs: the variables of an srun step. SLURM_NTASKS alone is also set in a job's
# batch shell and in an salloc shell, where this process is the only one and no peer will ever join.
SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def is_multiprocess_environment() -> bool:
  """True when a launcher started several processes (our launchers, an srun step, or a multi-worker TPU VM slice)."""
  num = _env_int("JAX_NUM_PROCESSES")
  if num is not None:
    return num > 1
  if all(os.environ.get(name) for name in SLURM_STEP_VARIABLES):
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
  """Call before any other JAX use. Explicit JAX_* variables win; otherwise JAX auto-detects (TPU VM, SLURM)."""
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
  import jax
  # CPU processes all-reduce through a collectives library; without one, a cross-process computation fails. gloo
  # ships in jaxlib (the default in 0.10, explicit so no other default can break CPU launches); TPU/GPU ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    num_processes, process_id = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    # With all three given, nothing is left to detect. Detection would also make up the visible devices: inside an
    # srun step jax takes SLURM_LOCALID as this process's only GPU (one process per GPU), so slurm.sbatch's one
    # process per node would drive GPU 0 alone. JAX_LOCAL_DEVICE_IDS still restricts them where that is wanted
    # (slurm.sbatch sets it when a node runs one process per GPU).
    explicit = num_processes is not None and process_id is not None
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               cluster_detection_method="deactivate" if explicit else None)
  else:
    try:
      jax.distributed.initialize()
    except ValueError:
      if not from_tpu_metadata:
        raise
      # jax found no TPU cluster in the metadata (a TPU VM outside GCE's TPU API, e.g. a GKE node without
      # TPU_WORKER_HOSTNAMES), and started nothing: one process, as before.
      logging.warning("jax.distributed: this TPU VM's metadata names no workers; running as a single process")
      return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


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
