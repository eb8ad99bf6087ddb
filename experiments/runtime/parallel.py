"""Data parallelism behind one switch: the same per-device step under ``jax.pmap`` or ``jax.shard_map``.

A per-device step is written once over the named axis :data:`AXIS` (``lax.pmean``/``lax.psum``/
``lax.all_gather`` over ``"batch"``). :class:`DataParallel` runs it

* ``"pmap"``: ``jax.pmap`` over this host's devices; after ``jax.distributed.initialize`` the collectives
  span every host. State leaves carry a leading axis of the local device count.
* ``"shard_map"``: ``jax.jit(jax.shard_map(...))`` on a one-axis mesh over all devices of all hosts. State
  leaves are global arrays replicated over the mesh; the batch is sharded along ``"batch"``.

Either way the caller sees the same three operations: :meth:`DataParallel.replicate` (host tree -> device
state), :meth:`DataParallel.shard_batch` (this host's rows -> device batch) and
:meth:`DataParallel.unreplicate` (device tree -> one host copy), so the training loop does not know which
mode runs. Per-device outputs of a step must be replica-invariant (reduced with pmean/psum or gathered).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"  # the named data-parallel axis every per-device step reduces over
MODES = ("pmap", "shard_map")

Mode = Literal["pmap", "shard_map"]


VERSION_BYTES = 512  # room for software_versions() in the cross-process comparison


def software_versions() -> str:
    """What this process runs: Python, jax, jaxlib, libtpu (where installed) and the checkout's git commit, e.g.
    ``"python 3.11.9, jax 0.10.2, jaxlib 0.10.2, nlpress 1b91341"``."""
    import importlib.metadata
    import os
    import platform
    import subprocess

    parts = [f"python {platform.python_version()}"]
    for package in ("jax", "jaxlib", "libtpu"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return ", ".join(parts + [f"nlpress {commit}"])


def version_mismatch(versions: list[str]) -> str | None:
    """The message for processes that run different software (``versions[i]``: process i's
    :func:`software_versions`), or None when they all agree."""
    if len(set(versions)) <= 1:
        return None
    lines = "\n".join(f"  process {i}: {v}" for i, v in enumerate(versions))
    return ("the processes of this run have different software, so their steps could differ; install the same "
            f"on every worker (python launch/tpu.py bootstrap pins it) and run again:\n{lines}")


def check_same_versions() -> None:
    """Stops a multi-process run whose processes run different software (RuntimeError naming every process's
    versions); a one-process run passes at once. Call after ``jax.distributed.initialize``."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    mine = software_versions().encode()[:VERSION_BYTES].ljust(VERSION_BYTES, b"\0")
    everyone = np.asarray(multihost_utils.process_allgather(np.frombuffer(mine, np.uint8)))
    problem = version_mismatch([bytes(row).rstrip(b"\0").decode(errors="replace") for row in everyone])
    if problem:
        raise RuntimeError(problem)


_barriers = 0  # barriers met so far: every process meets them in the same order, so their keys agree


def coordination_client():
    """The client of the distributed runtime's coordination service (barriers with timeouts, a key-value store),
    or None without ``jax.distributed``. JAX does not expose it publicly; its own serialization reads it so."""
    from jax._src import distributed

    return distributed.global_state.client


def barrier(name: str, timeout_s: float) -> None:
    """All processes of a multi-host run meet here (nothing with one process); raises RuntimeError naming the
    barrier when not every process arrives within ``timeout_s`` seconds.

    A barrier of the distributed runtime's coordination service (``wait_at_barrier``, what Orbax's and JAX's
    serialization barriers use), which has an explicit timeout, unlike a device collective. Meant for meetings
    that every process reaches at about the same time; a wait for work of unknown length on one process is
    :func:`experiments.runtime.single_process.run_on_process_0`."""
    global _barriers
    if jax.process_count() == 1:
        return
    key = f"nlpress/{name}/{_barriers}"
    _barriers += 1
    client = coordination_client()
    if client is None:  # pragma: no cover - several processes without jax.distributed (none known)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(key)
        return
    try:
        client.wait_at_barrier(key, int(timeout_s * 1000))
    except Exception as e:  # noqa: BLE001 - jaxlib's error type is not public
        raise RuntimeError(f"barrier {name!r}: not every process arrived within {timeout_s:g} s "
                           f"(--barrier_timeout_s): {e}") from e


def process_0_text(text: str, size: int = 2048) -> str:
    """Process 0's ``text`` (UTF-8, cut to ``size`` bytes) on every process; every process must call it. With one
    process, ``text`` itself."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = text.encode()[:size].ljust(size, b"\0")
    shared = np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(data, np.uint8)))
    return bytes(shared).rstrip(b"\0").decode(errors="replace")


def is_key(x) -> bool:
    """True for a typed PRNG key array (``jax.random.key``)."""
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, cpu_collectives: str | None = None) -> None:
    """Joins this process to a multi-host run; call before any other JAX call.

    With no arguments, JAX detects the cluster (TPU VMs / pod slices, Slurm, Open MPI). On one machine
    (``launch/local_multiprocess.py``) pass the coordinator ``127.0.0.1:PORT``, the process count and this
    process's id, and ``cpu_collectives="gloo"`` so that CPU devices of different processes can all-reduce.
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


class DataParallel:
    """Runs per-device steps over all devices of all processes; see the module docstring.

    Args:
      mode: ``"pmap"`` or ``"shard_map"``.
      devices: the devices to use (all of ``jax.devices()`` by default; tests pass a subset). In pmap mode
        the local ones among them are mapped over.
    """

    def __init__(self, mode: Mode = "pmap", devices=None):
        if mode not in MODES:
            raise ValueError(f"unknown parallelism {mode!r}; allowed: {list(MODES)}")
        self.mode = mode
        devices = list(jax.devices() if devices is None else devices)
        self.devices = devices
        self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
        if not self.local_devices:
            raise ValueError("none of the given devices belongs to this process")
        self.mesh = Mesh(np.array(devices), (AXIS,))
        # pmap places its per-device inputs on the local devices, one leading-axis slice each.
        self._local_mesh = Mesh(np.array(self.local_devices), (AXIS,))

    @property
    def num_devices(self) -> int:
        """Devices over all processes: the global batch is split this many ways."""
        return len(self.devices)

    @property
    def num_local_devices(self) -> int:
        return len(self.local_devices)

    # -- placement ------------------------------------------------------------------------------------

    def replicate(self, tree):
        """Host tree (numpy / jax arrays / typed keys) -> device state replicated on every device.

        Every process must pass the same values.
        """
        if self.mode == "pmap":
            n = self.num_local_devices
            sharding = NamedSharding(self._local_mesh, P(AXIS))

            def put(x):
                if is_key(x):
                    data = put(np.asarray(jax.random.key_data(x)))
                    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
                x = np.asarray(x)
                return jax.device_put(np.broadcast_to(x[None], (n, *x.shape)), sharding)
        else:
            sharding = NamedSharding(self.mesh, P())

            def put(x):
                if is_key(x):
                    data = put(np.asarray(jax.random.key_data(x)))
                    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
                return jax.make_array_from_process_local_data(sharding, np.asarray(x))

        return jax.tree.map(put, tree)

    def unreplicate(self, tree):
        """Device tree (replicated) -> one host copy: numpy arrays, typed keys as single-device key arrays."""

        def get(x):
            if not isinstance(x, jax.Array):
                return x
            local = x.addressable_data(0)  # this host's first replica; indexing happens in numpy (no compile)
            data = np.asarray(jax.random.key_data(local) if is_key(local) else local)
            if self.mode == "pmap":
                data = data[0]
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(local)) if is_key(local) else data

        return jax.tree.map(get, tree)

    def shard_batch(self, batch: dict[str, np.ndarray]):
        """This process's rows (numpy, leading dim B_local divisible by the local device count) -> device batch."""
        n = self.num_local_devices
        for name, x in batch.items():
            if x.shape[0] % n:
                raise ValueError(f"batch field {name!r} has {x.shape[0]} rows on this host, not divisible by "
                                 f"its {n} devices; make the global batch size a multiple of {self.num_devices}")
        if self.mode == "pmap":
            sharding = NamedSharding(self._local_mesh, P(AXIS))
            return {k: jax.device_put(np.asarray(x).reshape(n, x.shape[0] // n, *x.shape[1:]), sharding)
                    for k, x in batch.items()}
        sharding = NamedSharding(self.mesh, P(AXIS))
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(x)) for k, x in batch.items()}

    # -- compilation ----------------------------------------------------------------------------------

    def compile(self, fn: Callable[..., Any], *, donate_state: bool = False):
        """Compiles ``fn(state, batch) -> outputs`` written over :data:`AXIS` for this mode.

        ``state`` comes from :meth:`replicate`, ``batch`` from :meth:`shard_batch`; the outputs must be
        replicated (reduce or gather them inside ``fn``). ``donate_state`` lets XLA reuse the state's buffers.

        The step is written with pmap semantics: gradients are per device and reduced explicitly. shard_map
        therefore runs with ``check_vma=False``; with the check on, JAX would differentiate replicated inputs
        as invariant values and sum their gradients over the axis implicitly, on top of the explicit pmean.
        """
        donate = (0,) if donate_state else ()
        if self.mode == "pmap":
            # devices=None keeps pmap's multi-host behaviour (local devices, collectives over all hosts).
            devices = None if self.devices == jax.devices() else self.local_devices
            return jax.pmap(fn, axis_name=AXIS, devices=devices, donate_argnums=donate)
        mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False)
        return jax.jit(mapped, donate_argnums=donate)
