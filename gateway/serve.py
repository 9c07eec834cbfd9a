"""``tierfl gateway serve``: one gateway process on an edge server.

What runs, all from one TOML file (:func:`load_serve_config`; the keys of
:mod:`gateway.config` plus the ``[rounds]`` table of :mod:`gateway.rounds`):

- the :class:`GatewayService` with the device registry (``registry``) and the
  model's tensor shapes (``rounds.model``);
- a CoAP listener (``[coap]``, :class:`gateway.coap.CoapGateway`) and/or the
  MQTT intake against the broker (``[mqtt]``, :class:`gateway.mqtt.MqttIntake``);
- the Prometheus endpoint (``metrics_port``), plus a rounds-closed counter;
- who drives rounds: the local driver (:class:`gateway.rounds.LocalRoundDriver`)
  or, with ``--ray-address``, the cloud through the Ray actor ``gateway:<id>``
  (:mod:`gateway.ray_relay`).

Lifecycle. Start-up checks the whole configuration first (exit 2, naming the
key, before any socket is opened), then starts metrics, CoAP, MQTT, and the
round driver; a failure there (port in use, broker unreachable, Ray cluster
unreachable) stops what was started and exits 1 -- systemd's
``Restart=on-failure`` then retries. Once everything listens, one line
``gateway <id> ready: ...`` goes to stdout. SIGTERM or SIGINT stops it
gracefully: the CoAP endpoint closes, the MQTT intake answers what it had
queued and disconnects, the open round is closed and its aggregate written
(local driver), the Ray actor fails its pending calls, the metrics endpoint
closes; exit 0. A signal during start-up (while the broker or the Ray
cluster is being reached) abandons the start and exits 0 as well. The local
driver reaching ``rounds.max_rounds`` stops the process the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np
from prometheus_client import Counter

from devices.keys import DeviceRegistry, KeyFileError
from gateway.config import ConfigError, GatewayConfig, gateway_config_from_dict
from gateway.metrics import GatewayMetrics, serve_metrics
from gateway.partial_aggregate import PartialAggregate
from gateway.rounds import (
    LocalRoundDriver,
    ModelSource,
    RoundsConfig,
    load_model_source,
    rounds_config_from_dict,
)
from gateway.service import GatewayService

__all__ = [
    "GatewayControl",
    "GatewayServer",
    "ServeConfig",
    "StartupError",
    "load_serve_config",
    "serve",
]

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """Something outside the config stopped the gateway from starting (exit 1)."""


class StoppedDuringStartup(Exception):
    """SIGTERM/SIGINT arrived while a blocking start-up step was still running."""


T = TypeVar("T")


@dataclass(frozen=True)
class ServeConfig:
    """A gateway process's whole configuration: the gateway's, and its rounds."""

    gateway: GatewayConfig
    rounds: RoundsConfig | None
    path: Path | None = None


def serve_config_from_dict(doc: dict[str, Any], base: Path | None = None) -> ServeConfig:
    """Build a :class:`ServeConfig` from a parsed TOML document (relative paths against base)."""
    if not isinstance(doc, dict):
        raise ConfigError("expected a table")
    doc = dict(doc)
    rounds_doc = doc.pop("rounds", None)
    gw = gateway_config_from_dict(doc, base)
    rounds = rounds_config_from_dict(rounds_doc, base) if rounds_doc is not None else None
    return ServeConfig(gw, rounds)


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read a gateway TOML file; every :class:`ConfigError` starts with the file name."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: {e}") from None
    try:
        cfg = serve_config_from_dict(doc, p.resolve().parent)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return ServeConfig(cfg.gateway, cfg.rounds, p)


class GatewayControl:
    """Round changes that reach every transport: the service, plus MQTT's retained topics.

    CoAP hears of changes through :meth:`GatewayService.subscribe`; the MQTT
    intake republishes its retained model/round only when told, so every
    publish and close goes through here (the local driver and the Ray relay alike).
    """

    def __init__(
        self,
        service: GatewayService,
        mqtt: Any | None = None,
        on_close: Callable[[PartialAggregate], None] | None = None,
    ) -> None:
        self.service = service
        self.mqtt = mqtt  # a started gateway.mqtt.MqttIntake, or None
        self.on_close = on_close
        self.closed = 0  # rounds closed (a repeated close of the same round counts once)
        self._last_closed = -1

    def publish_model(
        self, params: np.ndarray, round_: int, deadline_s: float, encoding: str = "f32"
    ) -> str:
        version = self.service.publish_model(np.asarray(params), round_, deadline_s, encoding)
        if self.mqtt is not None:
            self.mqtt.announce(self.service.gateway_id)
        return version

    def close_round(self) -> PartialAggregate:
        agg = self.service.close_round()  # idempotent: the same aggregate again
        if agg.round != self._last_closed:
            self._last_closed = agg.round
            self.closed += 1
            if self.on_close is not None:
                self.on_close(agg)
        if self.mqtt is not None:
            self.mqtt.announce(self.service.gateway_id, model=False)
        return agg

    def buffered(self) -> int:
        return int(self.service.health()["buffered"])

    def round_info(self) -> dict[str, Any]:
        return self.service.round_info()

    def health(self) -> dict[str, Any]:
        return self.service.health()


def _check(cfg: ServeConfig, ray_address: str | None) -> None:
    """Config errors that need the whole picture (each names its key)."""
    gw = cfg.gateway
    if not gw.coap.enabled and not gw.mqtt.enabled:
        raise ConfigError("coap.enabled, mqtt.enabled: no listener enabled (enable at least one)")
    if gw.registry is None:
        raise ConfigError(
            "registry: required: a directory of <device>.pub files or a .toml/.json registry file"
        )
    if cfg.rounds is None:
        raise ConfigError(
            'rounds.model: required: add a [rounds] table with model = "<file.npz>" or '
            '"init:<model>:<dataset>" (the gateway needs the model\'s tensor shapes)'
        )
    if ray_address is None and cfg.rounds.out is None:
        raise ConfigError(
            "rounds.out: required: the directory the local round driver writes aggregates to "
            "(or run with --ray-address to let the cloud drive rounds)"
        )


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"rounds.out: {out}: cannot create: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"rounds.out: {out}: not writable by this user")


class GatewayServer:
    """One gateway process (see the module docstring); ``await run()`` returns the exit code."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        ray_address: str | None = None,
        ray_namespace: str | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        self.config = config
        self.ray_address = ray_address
        self.ray_namespace = ray_namespace
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stop_event: asyncio.Event | None = None
        self.service: GatewayService | None = None
        self.control: GatewayControl | None = None
        self.driver: LocalRoundDriver | None = None
        self.coap_address: tuple[str, int] | None = None
        self.metrics_port: int | None = None

    def request_stop(self, why: str = "stop requested") -> None:
        if self.stop_event is not None and not self.stop_event.is_set():
            log.info("stopping: %s", why)
            self.stop_event.set()

    def _say(self, line: str) -> None:
        print(line, file=self.stdout, flush=True)

    # --- start-up -----------------------------------------------------------------------

    def prepare(self) -> tuple[DeviceRegistry, ModelSource]:
        """Everything that can fail for config reasons, before any socket opens."""
        cfg = self.config
        _check(cfg, self.ray_address)
        assert cfg.gateway.registry is not None and cfg.rounds is not None
        try:
            registry = DeviceRegistry.load(cfg.gateway.registry)
        except (KeyFileError, OSError) as e:
            raise ConfigError(f"registry: {e}") from None
        if not len(registry):
            log.warning(
                "registry %s holds no device keys: every update will be refused",
                cfg.gateway.registry,
            )
        model = load_model_source(cfg.rounds.model, cfg.rounds.seed)
        if self.ray_address is None:
            assert cfg.rounds.out is not None
            _prepare_out(cfg.rounds.out)
        return registry, model

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or ``rounds.max_rounds``); 0, or 1 on a start-up failure."""
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        # Signal handlers first: a SIGTERM while the model loads still means a clean stop.
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
                installed.append(sig)
        try:
            return await self._run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        assert self.stop_event is not None
        registry, model = self.prepare()  # ConfigError propagates: exit 2
        gw = self.config.gateway
        rounds = self.config.rounds
        assert rounds is not None
        metrics = GatewayMetrics()
        closed_counter = Counter(
            "tierfl_gateway_rounds_closed_total",
            "Rounds this gateway closed (by the local driver or the cloud).",
            ("gateway",),
            registry=metrics.registry,
        )
        service = GatewayService(gw.id, registry, model.shapes, gw, metrics)
        self.service = service
        async with contextlib.AsyncExitStack() as stack:
            try:
                parts = await self._start(
                    stack, service, metrics, lambda _agg: closed_counter.labels(gw.id).inc()
                )
            except StartupError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                return 1
            except StoppedDuringStartup as e:
                self._say(f"gateway {gw.id} stopped during start-up ({e})")
                return 0
            control = self.control
            assert control is not None
            driver_task: asyncio.Task[None] | None = None
            if self.ray_address is None:
                assert rounds.out is not None
                self.driver = LocalRoundDriver(control, rounds, model, rounds.out)
                driver_task = asyncio.create_task(self.driver.run(self.stop_event), name="rounds")
                parts.append(
                    f"rounds: local, {rounds.duration_s:g} s"
                    + (f" or {rounds.quorum} updates" if rounds.quorum else "")
                    + f", aggregates in {rounds.out}"
                )
            self._say(f"gateway {gw.id} ready: " + "; ".join(parts))
            stop_wait = asyncio.create_task(self.stop_event.wait(), name="stop")
            waiting: set[asyncio.Task[Any]] = {stop_wait}
            if driver_task is not None:
                waiting.add(driver_task)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if driver_task is not None and driver_task in done:
                exc = driver_task.exception()
                if exc is not None:
                    print(f"error: round driver failed: {exc!r}", file=sys.stderr, flush=True)
                    self.request_stop("round driver failed")
                    return 1
                self.request_stop(f"rounds.max_rounds = {rounds.max_rounds} reached")
            stop_wait.cancel()
            if driver_task is not None and not driver_task.done():
                await driver_task
            # Leaving the stack shuts down in the order _start describes.
        self._say(self._summary())
        return 0

    async def _start(
        self,
        stack: contextlib.AsyncExitStack,
        service: GatewayService,
        metrics: GatewayMetrics,
        on_close: Callable[[PartialAggregate], None],
    ) -> list[str]:
        gw = self.config.gateway
        parts: list[str] = []
        # The stack unwinds LIFO. Shutdown order: Ray relay (no more cloud calls), CoAP,
        # MQTT drain (queued updates answered into the open round), flush (close the round,
        # write it, announce it closed on the still-connected MQTT), MQTT disconnect, metrics.
        if gw.metrics_port is not None:
            try:
                server = serve_metrics(gw.metrics_port, gw.metrics_host, metrics)
            except OSError as e:
                raise StartupError(
                    f"metrics: cannot listen on {gw.metrics_host}:{gw.metrics_port}: "
                    f"{e.strerror or e}"
                ) from None
            self.metrics_port = int(server.server_port)

            def stop_metrics() -> None:
                server.shutdown()
                server.server_close()

            stack.callback(stop_metrics)
            parts.append(f"metrics http://{_hostport(gw.metrics_host, self.metrics_port)}/metrics")
        mqtt = None
        if gw.mqtt.enabled:
            from gateway.mqtt import MqttIntake, MqttIntakeError

            mqtt = MqttIntake(service, gw.mqtt)
            log.info("connecting to the MQTT broker at %s", gw.mqtt.broker)
            try:
                await self._blocking(mqtt.start, "connecting to the MQTT broker")
            except MqttIntakeError as e:
                raise StartupError(str(e)) from None
            intake = mqtt

            def stop_mqtt() -> None:
                intake.stop()  # answers what is still queued (round closed by now), disconnects
                if self.control is not None:
                    self.control.mqtt = None  # nothing left to announce to

            stack.callback(stop_mqtt)
        stack.callback(self._flush)
        if mqtt is not None:
            stack.callback(mqtt.wait_idle, 5.0)
            parts.append(f"mqtt {gw.mqtt.broker} (topics tierfl/{gw.id}/...)")
        self.control = GatewayControl(service, mqtt, on_close)
        if gw.coap.enabled:
            try:
                from gateway.coap import CoapGateway
            except ImportError as e:
                raise StartupError(f"coap: the CoAP listener is not available ({e})") from None
            coap = CoapGateway(service, gw.coap)
            try:
                self.coap_address = await coap.start()
            except OSError as e:
                with contextlib.suppress(Exception):
                    await coap.stop()
                raise StartupError(
                    f"coap: cannot listen on {_hostport(gw.coap.host, gw.coap.port)} (UDP): "
                    f"{e.strerror or e}"
                ) from None
            stack.push_async_callback(coap.stop)
            parts.append(f"coap coap://{_hostport(*self.coap_address)}")
        if self.ray_address is not None:
            from gateway.ray_relay import RAY_NAMESPACE, actor_name, start_relay

            control = self.control
            handlers: dict[str, Callable[..., Any]] = {
                "publish_model": control.publish_model,
                "close_round": control.close_round,
                "round_info": control.round_info,
                "health": control.health,
            }
            ns = self.ray_namespace or RAY_NAMESPACE
            try:
                poller = await self._blocking(
                    lambda: start_relay(self.ray_address or "", gw.id, handlers, namespace=ns),
                    "joining the Ray cluster",
                )
            except RuntimeError as e:
                raise StartupError(str(e)) from None

            def stop_ray() -> None:
                poller.stop()
                import ray

                with contextlib.suppress(Exception):
                    ray.shutdown()

            stack.callback(stop_ray)
            parts.append(
                f"rounds: from the cloud via Ray actor {actor_name(gw.id)!r} (namespace {ns})"
            )
        return parts

    async def _blocking(self, fn: Callable[[], T], what: str) -> T:
        """Run a blocking start-up step in a daemon thread; give up on it if asked to stop.

        Not the loop's default executor: that one is joined when the loop closes, and
        a step that hangs (ray.init retrying an unreachable cluster for minutes) would
        then keep a SIGTERM-ed gateway alive. An abandoned daemon thread dies with us.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

        def work() -> None:
            try:
                result: Any = fn()
                ok = True
            except BaseException as e:
                result, ok = e, False
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, ok, result)

        threading.Thread(target=work, name=f"tierfl-start ({what})", daemon=True).start()
        assert self.stop_event is not None
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.stop_event.wait())
        waiters: set[asyncio.Future[Any]] = {fut, stop}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if fut.done():
            return fut.result()
        fut.cancel()
        raise StoppedDuringStartup(what)

    def _flush(self) -> None:
        """Close the open round: written by the local driver, or dropped (the cloud is gone).

        Either way the round is announced closed, so MQTT devices do not train
        for a retained round that no process serves any more.
        """
        try:
            if self.driver is not None:
                self.driver.flush()
            elif self.control is not None and self.service is not None and self.service.round >= 0:
                info = self.service.health()
                agg = self.control.close_round()
                if info["open"] and agg.count:
                    log.warning(
                        "round %d closed at shutdown: its %d update(s) were not collected",
                        agg.round,
                        agg.count,
                    )
        except Exception:
            log.exception("could not close the last round")

    def _summary(self) -> str:
        svc = self.service
        h = svc.health() if svc is not None else {}
        closed = self.control.closed if self.control is not None else 0
        return (
            f"gateway {self.config.gateway.id} stopped: {closed} round(s) closed, "
            f"{h.get('accepted', 0)} accepted, {h.get('duplicates', 0)} duplicate, "
            f"{h.get('rejected', 0)} rejected"
        )


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(
    config_path: str | Path,
    *,
    ray_address: str | None = None,
    ray_namespace: str | None = None,
) -> int:
    """Run a gateway from a config file until stopped; the process exit code (0, 1 or 2)."""
    try:
        cfg = load_serve_config(config_path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = GatewayServer(cfg, ray_address=ray_address, ray_namespace=ray_namespace)
    try:
        return asyncio.run(server.run())
    except ConfigError as e:
        print(f"error: {config_path}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a Ctrl-C before the signal handlers were in place
        print("interrupted", file=sys.stderr)
        return 130
