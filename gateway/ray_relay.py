"""The cloud's handle on a real gateway process: a named Ray actor that relays calls to it.

``tierfl gateway serve --ray-address ADDR`` joins the Ray cluster as a
driver and creates an actor named ``gateway:<id>`` (namespace ``tierfl``) on
its own node. The cloud finds it with :func:`gateway_actor` and calls::

    gw = gateway_actor("gw00")                       # ray.get_actor under the hood
    version = ray.get(gw.publish_model.remote(params, round_, deadline_s, "int8"))
    ...
    partial = ray.get(gw.close_round.remote())       # a gateway.partial_aggregate.PartialAggregate

Why a relay and not the gateway itself as the actor: the gateway's sockets,
metrics endpoint and systemd lifecycle belong to the ``serve`` process on the
edge server, and a Ray actor is a separate worker process. So the actor is a
mailbox (:class:`GatewayRelay`): each cloud call is queued and awaited; the
serve process long-polls :meth:`GatewayRelay.next_call` from a thread
(:class:`RelayPoller`), runs the call on its :class:`GatewayService`, and hands
the result (or the exception) back with :meth:`GatewayRelay.complete`. The
actor is *not* detached: it belongs to the serve process's Ray job, so when
the gateway stops, its handle dies with it and the cloud's calls fail with
an actor-died error instead of hanging on a gateway that is gone.

This module imports Ray only inside functions: ``import gateway`` must work
on an edge server without Ray; :class:`GatewayRelay` itself is plain asyncio
(and tested without Ray).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = [
    "RAY_NAMESPACE",
    "GatewayRelay",
    "RelayClosed",
    "RelayPoller",
    "actor_name",
    "gateway_actor",
    "start_relay",
]

log = logging.getLogger(__name__)

RAY_NAMESPACE: Final = "tierfl"
#: What the cloud may call; anything else never reaches the gateway.
METHODS: Final = ("publish_model", "close_round", "round_info", "health")

Call = tuple[int, str, tuple[Any, ...]]


def actor_name(gateway_id: str) -> str:
    """The Ray actor name of a gateway (``gateway:<id>``, as in the placement resources)."""
    return f"gateway:{gateway_id}"


class RelayClosed(RuntimeError):
    """The gateway process stopped (or never polled) while a call was waiting."""


class GatewayRelay:
    """The actor's body: a queue of cloud calls and the futures waiting for their results.

    Every public coroutine runs on the actor's event loop (Ray runs async
    actors' methods concurrently), so a ``close_round`` waiting for the
    gateway does not block the gateway's own ``next_call``/``complete``.
    ``call_timeout_s`` bounds how long a cloud call waits for the gateway.
    """

    def __init__(self, gateway_id: str, call_timeout_s: float = 60.0) -> None:
        self.gateway_id = gateway_id
        self.call_timeout_s = call_timeout_s
        self._queue: asyncio.Queue[Call] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._closed: str | None = None
        self.calls = 0

    # --- what the cloud calls ---------------------------------------------------------

    async def publish_model(
        self, params: Any, round_: int, deadline_s: float, encoding: str = "f32"
    ) -> str:
        """Serve ``params`` as round ``round_`` for ``deadline_s`` s; returns the model hash."""
        result = await self._call("publish_model", params, round_, deadline_s, encoding)
        return str(result)

    async def close_round(self) -> Any:
        """Close the gateway's round and return its ``PartialAggregate``."""
        return await self._call("close_round")

    async def round_info(self) -> Any:
        return await self._call("round_info")

    async def health(self) -> Any:
        return await self._call("health")

    async def ping(self) -> str:
        """Answered by the actor itself: is the handle alive (without asking the gateway)?"""
        return self.gateway_id

    async def _call(self, method: str, *args: Any) -> Any:
        if self._closed is not None:
            raise RelayClosed(f"gateway {self.gateway_id}: {self._closed}")
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = fut
        self.calls += 1
        await self._queue.put((call_id, method, args))
        try:
            return await asyncio.wait_for(fut, timeout=self.call_timeout_s)
        except TimeoutError:
            raise RelayClosed(
                f"gateway {self.gateway_id} did not answer {method} within "
                f"{self.call_timeout_s:g} s"
            ) from None
        finally:
            self._waiting.pop(call_id, None)

    # --- what the gateway process calls -----------------------------------------------

    async def next_call(self, wait_s: float = 1.0) -> Call | None:
        """The next queued call, or None after ``wait_s`` without one (a long poll)."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout=wait_s)
        except TimeoutError:
            return None

    async def complete(self, call_id: int, ok: bool, value: Any) -> bool:
        """Hand the result (``ok``) or the exception (not ``ok``) of a call back to its caller.

        False if nobody waits any more (the caller timed out).
        """
        fut = self._waiting.get(call_id)
        if fut is None or fut.done():
            return False
        if ok:
            fut.set_result(value)
        else:
            exc = value if isinstance(value, BaseException) else RuntimeError(str(value))
            fut.set_exception(exc)
        return True

    async def shutdown(self, reason: str = "the gateway process is stopping") -> int:
        """Refuse new calls and fail the waiting ones; returns how many were failed."""
        self._closed = reason
        failed = 0
        for fut in list(self._waiting.values()):
            if not fut.done():
                fut.set_exception(RelayClosed(f"gateway {self.gateway_id}: {reason}"))
                failed += 1
        while not self._queue.empty():
            self._queue.get_nowait()
        return failed


class RelayPoller:
    """The serve process's side: long-poll the actor, run each call, send back the result.

    ``handlers`` maps the :data:`METHODS` names to callables on the gateway
    (they run on this poller's thread; the service is thread-safe). ``remote``
    is how a Ray call is made and awaited (``ray.get``), injectable for tests.
    """

    def __init__(
        self,
        handle: Any,
        handlers: Mapping[str, Callable[..., Any]],
        *,
        get: Callable[..., Any] | None = None,
        wait_s: float = 1.0,
    ) -> None:
        unknown = set(handlers) - set(METHODS)
        if unknown:
            raise ValueError(f"no such relay methods: {sorted(unknown)}")
        self.handle = handle
        self.handlers = dict(handlers)
        self.wait_s = wait_s
        self._get = get
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.served = 0
        self.errors = 0

    def _ray_get(self, ref: Any, timeout: float) -> Any:
        if self._get is not None:
            return self._get(ref, timeout=timeout)
        import ray

        return ray.get(ref, timeout=timeout)

    def start(self) -> RelayPoller:
        self._thread = threading.Thread(target=self._run, name="tierfl-ray-relay", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                call = self._ray_get(self.handle.next_call.remote(self.wait_s), self.wait_s + 30)
            except Exception as e:
                if self._stop.is_set():
                    return
                self.errors += 1
                log.warning("Ray relay: polling the actor failed (%s); retrying", e)
                self._stop.wait(1.0)
                continue
            if call is not None:
                self._serve(call)

    def _serve(self, call: Call) -> None:
        call_id, method, args = call
        handler = self.handlers.get(method)
        try:
            if handler is None:
                raise ValueError(f"gateway does not serve {method!r}")
            ok, value = True, handler(*args)
        except Exception as e:  # the cloud gets the exception; the gateway keeps serving
            ok, value = False, e
            log.warning("Ray relay: %s failed: %s", method, e)
        self.served += 1
        try:
            self._ray_get(self.handle.complete.remote(call_id, ok, value), 30)
        except Exception as e:
            self.errors += 1
            log.warning("Ray relay: could not return the result of %s: %s", method, e)

    def stop(self, reason: str = "the gateway process is stopping", timeout: float = 5.0) -> None:
        """Stop polling and fail the calls still waiting in the actor."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self._ray_get(self.handle.shutdown.remote(reason), timeout)
        if self._thread is not None:
            self._thread.join(self.wait_s + timeout)
            self._thread = None


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``HOST:PORT`` nobody listens on (``ray.init`` would retry for minutes).

    ``auto``, ``local`` and ``ray://`` addresses are left to Ray.
    """
    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RuntimeError(f"--ray-address: expected HOST:PORT or 'auto', got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RuntimeError(
            f"cannot reach the Ray cluster at {address!r}: {e.strerror or e}"
        ) from None


def start_relay(
    address: str,
    gateway_id: str,
    handlers: Mapping[str, Callable[..., Any]],
    *,
    namespace: str = RAY_NAMESPACE,
    call_timeout_s: float = 60.0,
) -> RelayPoller:
    """Join the cluster at ``address``, create ``gateway:<id>`` on this node, start polling.

    Raises ``RuntimeError`` with a readable message when Ray is missing, the
    cluster is unreachable, or another live gateway already holds the name.
    """
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    except ImportError as e:
        raise RuntimeError(f"--ray-address needs Ray installed ({e})") from None
    name = actor_name(gateway_id)
    probe_address(address)
    try:
        if not ray.is_initialized():
            ray.init(
                address=address,
                namespace=namespace,
                logging_level=logging.ERROR,
                log_to_driver=False,
                configure_logging=False,
            )
        node = ray.get_runtime_context().get_node_id()
        actor_cls = ray.remote(num_cpus=0, max_restarts=0)(GatewayRelay)
        handle: Any = actor_cls.options(  # type: ignore[attr-defined]
            name=name,
            namespace=namespace,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        ).remote(gateway_id, call_timeout_s)
        ray.get(handle.ping.remote(), timeout=60)
    except ValueError as e:  # Ray: "The name ... is already taken"
        raise RuntimeError(
            f"cannot register Ray actor {name!r} in namespace {namespace!r}: {e}"
        ) from None
    except Exception as e:
        raise RuntimeError(f"cannot join the Ray cluster at {address!r}: {e}") from None
    log.info("Ray actor %s registered in namespace %s on node %s", name, namespace, node[:12])
    return RelayPoller(handle, handlers).start()


def gateway_actor(gateway_id: str, namespace: str = RAY_NAMESPACE) -> Any:
    """The cloud side: the handle of a running gateway's relay actor (``ray.get_actor``)."""
    import ray

    return ray.get_actor(actor_name(gateway_id), namespace=namespace)
