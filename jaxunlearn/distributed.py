"""Multi-process start-up: `jax.distributed.initialize` for Cloud TPU slices and GPU/CPU clusters.

`initialize()` runs before anything touches a device (the CLI calls it first). It decides how
the processes of one run find each other:

  explicit cluster   coordinator address, process count and this process's id, from arguments
                     (the CLI's `--coordinator HOST:PORT --num-processes N --process-id I`)
                     or the environment variables JAXUNLEARN_COORDINATOR,
                     JAXUNLEARN_NUM_PROCESSES and JAXUNLEARN_PROCESS_ID (arguments win).
                     GPU nodes, or CPU processes (whose collectives then go through gloo).
  Cloud TPU          no explicit cluster and a TPU VM detected (TPU_* worker variables, or a
                     Google TPU PCI device): `jax.distributed.initialize()` with no arguments,
                     which reads the slice's workers from the TPU metadata.
  single process     neither, or a process count of 1: nothing to do.

Every process of a run must see the same run directory (a shared filesystem: NFS, Filestore,
gcsfuse); process 0 writes the small files (config, metrics, metadata, exports) and all
processes write their shards of Orbax checkpoints.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
from typing import Mapping

from jaxunlearn.errors import JaxunlearnError

ENV_COORDINATOR = "JAXUNLEARN_COORDINATOR"
ENV_NUM_PROCESSES = "JAXUNLEARN_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXUNLEARN_PROCESS_ID"

# variables a Cloud TPU VM (GCE or GKE) sets for its workers
TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE")
GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips v3 .. v7 (Google's vendor id also covers its virtual NIC,
# so the vendor alone is not enough)
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


class DistributedConfigError(JaxunlearnError, ValueError):
    """Incomplete or malformed cluster settings."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """An explicit cluster: where the coordinator listens, how many processes, which one this is."""

    coordinator: str
    num_processes: int
    process_id: int


def _int(value: str | int, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{name}: expected an integer, got {value!r}") from None


def explicit_cluster(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Cluster | None:
    """The explicit cluster from arguments, else the JAXUNLEARN_* variables; None when there is
    none or it has a single process. Partial or malformed settings raise DistributedConfigError."""
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    if num_processes is None and environ.get(ENV_NUM_PROCESSES):
        num_processes = _int(environ[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES)
    if process_id is None and environ.get(ENV_PROCESS_ID):
        process_id = _int(environ[ENV_PROCESS_ID], ENV_PROCESS_ID)
    if num_processes is None and coordinator is None and process_id is None:
        return None
    if num_processes is not None and num_processes < 1:
        raise DistributedConfigError(f"number of processes: must be at least 1, got {num_processes}")
    if num_processes == 1 and process_id in (None, 0):
        return None
    settings = (
        (f"coordinator (--coordinator or {ENV_COORDINATOR})", coordinator),
        (f"number of processes (--num-processes or {ENV_NUM_PROCESSES})", num_processes),
        (f"process id (--process-id or {ENV_PROCESS_ID})", process_id),
    )
    missing = [name for name, value in settings if value is None]
    if missing:
        raise DistributedConfigError(f"multi-process run needs {', '.join(missing)}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedConfigError(f"coordinator {coordinator!r}: expected HOST:PORT")
    if not 0 <= process_id < num_processes:
        raise DistributedConfigError(f"process id {process_id}: must be in 0..{num_processes - 1}")
    return Cluster(coordinator, num_processes, process_id)


def on_cloud_tpu(environ: Mapping[str, str] | None = None, pci_root: str = "/sys/bus/pci/devices") -> bool:
    """True on a Cloud TPU VM: a TPU worker variable is set, or a TPU chip is on the PCI bus."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in TPU_ENV_VARS):
        return True
    for device in glob.glob(os.path.join(pci_root, "*")):
        try:
            vendor = pathlib.Path(device, "vendor").read_text().strip()
            if vendor == GOOGLE_PCI_VENDOR and pathlib.Path(device, "device").read_text().strip() in TPU_PCI_DEVICES:
                return True
        except OSError:
            continue
    return False


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Join the run's processes (see the module docstring); returns what was done:
    "cluster", "tpu", "single" or "already" (jax.distributed was initialised before)."""
    import jax

    cluster = explicit_cluster(coordinator, num_processes, process_id, environ)
    if jax.distributed.is_initialized():
        return "already"
    if cluster is not None:
        # CPU processes exchange collectives through gloo (no effect on GPU or TPU devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id)
        return "cluster"
    if on_cloud_tpu(environ):
        jax.distributed.initialize()
        return "tpu"
    return "single"


def is_primary() -> bool:
    """True in process 0, the one that writes run-level files."""
    import jax

    return jax.process_index() == 0


def all_processes_agree(flag: bool) -> bool:
    """True when `flag` is True in every process (a collective: every process must call it)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))
    return bool(np.all(flags))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing to do in a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def require_shared(path: str | os.PathLike) -> None:
    """Raise in every process unless every process sees `path` (just written by process 0):
    a run directory must be on a filesystem all processes share."""
    barrier("require_shared")
    if not all_processes_agree(pathlib.Path(path).exists()):
        raise DistributedConfigError(
            f"{path}: not visible to every process; put the run directory on a filesystem all hosts share "
            "(NFS, Filestore, gcsfuse)"
        )
