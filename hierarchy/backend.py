"""Where the actors run: Ray (one process per actor) or in this process.

The actor classes in ``hierarchy.actors`` are plain Python classes. A backend
turns each into a handle with ``call(method, *args)`` returning a future and
``gather(futures)`` resolving them, so the emulation driver and the actors'
calls to each other are the same code on Ray and in-process. In-process is a
placement too (everything packed into one process): it has no Ray start-up
cost, which matters for small fleets and for the unit tests of the driver.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol


class Handle(Protocol):
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


class LocalHandle:
    """Calls run eagerly; the 'future' is the value itself."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._obj, method)(*args, **kwargs)


class RayHandle:
    """Wraps a Ray actor handle; picklable, so actors can pass it to each other."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._actor, method).remote(*args, **kwargs)


def gather(futures: Sequence[Any]) -> list[Any]:
    """Resolve a list of futures from either backend (Ray refs or plain values)."""
    import sys

    if "ray" in sys.modules:
        import ray

        if any(isinstance(f, ray.ObjectRef) for f in futures):
            return list(ray.get(list(futures)))
    return list(futures)


def put(value: Any) -> Any:
    """Share a large value once (Ray object store) instead of copying it per call."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return ray.put(value)
    return value


class Backend:
    name: str

    def spawn(
        self,
        cls: type,
        *args: Any,
        resources: dict[str, float] | None = None,
        num_cpus: float = 0,
        pin_node: str | None = None,
        **kwargs: Any,
    ) -> Handle:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    def cluster_resources(self) -> dict[str, float]:
        return {}


class LocalBackend(Backend):
    name = "local"

    def spawn(
        self,
        cls: type,
        *args: Any,
        resources: dict[str, float] | None = None,
        num_cpus: float = 0,
        pin_node: str | None = None,
        **kwargs: Any,
    ) -> Handle:
        return LocalHandle(cls(*args, **kwargs))


# glibc malloc for the actor processes. A round allocates and frees the same few
# hundred MB (torch's training buffers, [n, P] update blocks): by default glibc
# mmaps blocks over a threshold and trims the heap's free top, so every round
# faults the same pages in again, and on a VM a fault costs microseconds (a
# 1,000-device device-shares round spent ~50 ms of its training phase on it).
# Serve blocks under 32 MB from the heap and keep up to 64 MB of free top per
# heap: a few tens of MB more resident per process, no per-round faults.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20),
}


def malloc_env() -> dict[str, str]:
    """:data:`MALLOC_ENV`, except where the driver's environment already says otherwise."""
    return {k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}


class RayBackend(Backend):
    """Starts (or joins, with ``address``) a Ray cluster quietly, sized to the machine."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        if not address:
            # A private local cluster stays on loopback: by default Ray advertises the host's
            # interface address and its daemons talk over it. Read when ray is imported.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import logging

        import ray

        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs: dict[str, Any] = dict(
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
                configure_logging=True,
            )
            if address:
                kwargs["address"] = address
            else:
                # "local" forces a fresh private cluster: a bare ray.init() would silently join
                # any cluster someone started on this machine with `ray start`.
                kwargs["address"] = "local"
                kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
                # Small object store: partial aggregates and parameter vectors are MBs, and a
                # default 30 % of RAM per local cluster adds up when tests start several.
                kwargs["object_store_memory"] = 512 * 1024 * 1024
            kwargs["runtime_env"] = {"env_vars": malloc_env()}
            ray.init(**kwargs)

    def driver_node_id(self) -> str:
        """The id of the Ray node this driver runs on."""
        return str(self._ray.get_runtime_context().get_node_id())

    def driver_node_ip(self) -> str:
        """The address of the Ray node this driver runs on, as the cluster knows it."""
        me = self.driver_node_id()
        for node in self._ray.nodes():
            if node.get("NodeID") == me:
                return str(node["NodeManagerAddress"])
        return str(self._ray.util.get_node_ip_address())

    def spawn(
        self,
        cls: type,
        *args: Any,
        resources: dict[str, float] | None = None,
        num_cpus: float = 0,
        pin_node: str | None = None,
        **kwargs: Any,
    ) -> Handle:
        """An actor; ``pin_node``: the Ray node id it must run on (hard affinity)."""
        remote_cls: Any = self._ray.remote(cls)
        options: dict[str, Any] = dict(num_cpus=num_cpus, resources=resources or {})
        if pin_node is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(pin_node, soft=False)
        actor = remote_cls.options(**options).remote(*args, **kwargs)
        return RayHandle(actor)

    def cluster_resources(self) -> dict[str, float]:
        return dict(self._ray.cluster_resources())

    def shutdown(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
