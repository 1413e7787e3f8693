"""Two CPU processes on localhost: each cuts its rows of the same global batch and to_global
assembles one global array that equals the batch every process built."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent("""
    import os, sys
    pid, port = int(sys.argv[1]), sys.argv[2]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxunlearn.data import PairedIterator, host_slice, to_global
    fake = lambda n, t: [{"input_ids": [t, i, i], "labels": [-100, i, i]} for i in range(n)]
    it = PairedIterator(fake(10, 1), fake(13, 2), 8, seed=3, buckets=(4,))
    full = it.batch_at(5)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    local = host_slice(full)
    assert local["forget"]["input_ids"].shape == (4, 4)
    glob = to_global(local, NamedSharding(mesh, P("data")))
    for part in ("forget", "retain"):
        for key in ("input_ids", "attention_mask", "labels"):
            arr = glob[part][key]
            assert arr.shape == (8, 4)
            np.testing.assert_array_equal(multihost_utils.process_allgather(arr, tiled=True), full[part][key])
    print("ok", pid, jax.process_count(), jax.device_count())
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_to_global_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-2000:]
        assert f"ok {i} 2 4" in out
