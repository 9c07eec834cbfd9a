"""``tierfl device``: the reference device -- what a Raspberry-Pi-class device or a phone runs.

One loop per round::

    round info -> model (hash-checked) -> train on the local shard -> encode -> seal -> send
    -> the gateway's verdict (accepted / duplicate / rejected + reason) -> wait for the next round

over CoAP (``coap://HOST:PORT``, :mod:`devices.transport_coap`) or MQTT
(``mqtt://HOST:PORT[/GATEWAY]`` or ``mqtts://``, :mod:`devices.transport_mqtt`).
MQTT topics name the gateway; without ``/GATEWAY`` in the URL or
``--gateway-id``, the device looks at the broker's retained
``tierfl/+/round`` topics and uses the one gateway it finds there.

The data is shard ``--device-index N`` of ``devices.datasets.load_federated(
dataset, --num-devices M)`` -- the same split the emulator makes, so a real
device and an emulated one with the same index see the same samples. The
model is the dataset's default (``--model`` overrides) and must have as many
parameters as the model the gateway serves. Lossy codecs keep an
error-feedback residual across rounds (:class:`devices.compression.ErrorFeedback`).

Which verdicts count as a round done: accepted and duplicate (delivered), and
permanent refusals (``bad-shape``, ``norm-bound``, ``too-large``...: sending
again would not help). ``round-closed``, ``stale-round``, ``stale-base``,
``rate-limited`` and ``incomplete`` mean "missed this one": the device waits for
the next round and tries again. ``unknown-device`` and ``bad-signature`` end
the run (exit 3): the gateway does not know this key.

Exit codes: 0 all rounds delivered (or stopped by SIGTERM/SIGINT); 1 the
gateway could not be reached (after ``--retries`` attempts with exponential
backoff) or no round opened within ``--wait-s``; 2 bad arguments (URL, key
file, dataset shard, a model that does not match the gateway's); 3 the
gateway refused an update for good.

torch is imported only once there is a gateway to train for, so argument and
connection errors come back in a fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import urlsplit

import numpy as np

from devices.argtypes import number, positive_float
from devices.keys import DEVICE_ID_PATTERN, KeyFileError, check_device_id, load_private_key

__all__ = [
    "TRANSIENT_REASONS",
    "Answer",
    "DeviceError",
    "DeviceOptions",
    "GatewayURL",
    "add_device_parser",
    "cmd_device",
    "parse_gateway_url",
    "run_device",
]

#: Refusals that mean "this round was missed": wait for the next one and try again.
TRANSIENT_REASONS: Final = frozenset(
    {"round-closed", "stale-round", "stale-base", "rate-limited", "incomplete"}
)
#: Refusals that no later round can fix: the gateway does not accept this device's key.
FATAL_REASONS: Final = frozenset({"unknown-device", "bad-signature"})
_DEFAULT_PORTS: Final = {"coap": 5683, "mqtt": 1883, "mqtts": 8883}

T = TypeVar("T")


class DeviceError(Exception):
    """Ends the run with ``code`` (1 unreachable, 2 bad input, 3 refused) and one message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class LinkError(ConnectionError):
    """A transport failure worth retrying (no answer, connection refused or lost)."""


# --- the gateway URL ----------------------------------------------------------------


@dataclass(frozen=True)
class GatewayURL:
    """Where the gateway is: ``scheme`` coap / mqtt / mqtts, host, port, gateway id if named."""

    scheme: str
    host: str
    port: int
    gateway_id: str | None = None

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        tail = f"/{self.gateway_id}" if self.gateway_id else ""
        return f"{self.scheme}://{self.netloc}{tail}"


def parse_gateway_url(url: str) -> GatewayURL:
    """``coap://HOST[:PORT]``, ``mqtt://HOST[:PORT][/GATEWAY]`` or ``mqtts://...``.

    ``ValueError`` says what is wrong (scheme, host, port, path).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        hint = " (DTLS is not supported; use coap:// or mqtts://)" if scheme == "coaps" else ""
        raise ValueError(
            f"--gateway: expected coap://HOST:PORT or mqtt[s]://HOST:PORT[/GATEWAY], "
            f"got {url!r}{hint}"
        )
    if not parts.hostname:
        raise ValueError(f"--gateway: no host in {url!r}")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"--gateway: bad port in {url!r}: {e}") from None
    if port == 0:
        raise ValueError(f"--gateway: port must be 1-65535 in {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(
            f"--gateway: {url!r} has user info, a query or a fragment; "
            "MQTT credentials go in --username / --password-file"
        )
    path = parts.path.strip("/")
    gateway_id: str | None = None
    if path:
        if scheme == "coap":
            raise ValueError(f"--gateway: a coap:// URL has no path (got {url!r})")
        try:
            gateway_id = check_device_id(path)
        except ValueError:
            raise ValueError(
                f"--gateway: {path!r} in {url!r} is not a gateway id ({DEVICE_ID_PATTERN})"
            ) from None
    return GatewayURL(scheme, parts.hostname, port or _DEFAULT_PORTS[scheme], gateway_id)


# --- links --------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """The gateway's verdict on one update, whatever the transport."""

    status: str  # accepted | duplicate | rejected
    reason: str | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "rejected"


class Link(Protocol):
    name: str

    def connect(self) -> None: ...

    def round_info(self) -> dict[str, Any]: ...

    def model(self) -> Any: ...  # devices.model_wire.ModelDownload

    def send(self, envelope: bytes) -> Answer: ...

    def close(self) -> None: ...


class CoapLink:
    """The CoAP client driven from this (synchronous) thread through its own event loop."""

    name = "coap"

    def __init__(self, url: GatewayURL, timeout_s: float) -> None:
        import aiocoap.error

        from devices.downlink import DownlinkError
        from devices.transport_coap import CoapDeviceClient, CoapLinkError

        # DownlinkError: a corrupt model download (hash mismatch) is fetched again;
        # ValueError: an unreadable CBOR round document (cbor2's decode error is one)
        self._errors: tuple[type[BaseException], ...] = (
            CoapLinkError,
            aiocoap.error.Error,
            OSError,
            DownlinkError,
            ValueError,
        )
        self._loop = asyncio.new_event_loop()
        self._client = CoapDeviceClient(f"coap://{url.netloc}", timeout_s=timeout_s)

    def _run(self, coro: Any) -> Any:
        try:
            return self._loop.run_until_complete(coro)
        except self._errors as e:
            raise LinkError(str(e)) from None

    def connect(self) -> None:
        self._run(self._client.open())
        self.round_info()  # a request that must be answered: is anyone there?

    def round_info(self) -> dict[str, Any]:
        return dict(self._run(self._client.get_round()))

    def model(self) -> Any:
        return self._run(self._client.fetch_model())

    def send(self, envelope: bytes) -> Answer:
        reply = self._run(self._client.post_update(envelope))
        text = reply.payload.decode("utf-8", "replace")
        if reply.ok:
            status = text if text in ("accepted", "duplicate") else "accepted"
            return Answer(status, None, f"CoAP {reply.code}")
        reason = reply.reason or "malformed"
        detail = text.split(":", 1)[1].strip() if ":" in text else text
        return Answer("rejected", reason, f"CoAP {reply.code}: {detail}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(self._client.close())
        self._loop.close()


@dataclass(frozen=True)
class MqttAuth:
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None


def discover_mqtt_gateways(
    url: GatewayURL,
    auth: MqttAuth,
    wait_s: float = 10.0,
    settle_s: float = 0.3,
    prefix: str = "tierfl",
) -> list[str]:
    """Gateway ids with a retained round topic on the broker (``<prefix>/+/round``)."""
    import ssl

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    found: set[str] = set()
    ready, subscribed = threading.Event(), threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    if auth.username is not None:
        client.username_pw_set(auth.username, auth.password)
    if url.scheme == "mqtts" or auth.tls_ca is not None:
        client.tls_set(
            ca_certs=str(auth.tls_ca) if auth.tls_ca else None, cert_reqs=ssl.CERT_REQUIRED
        )

    refused: list[str] = []

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        else:
            c.subscribe(f"{prefix}/+/round", qos=0)
        ready.set()

    def on_subscribe(c: Any, userdata: Any, mid: Any, codes: Any, props: Any) -> None:
        subscribed.set()

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if msg.retain and len(parts) == 3 and msg.payload:
            found.add(parts[1])

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(url.host, url.port, 30)
    except OSError as e:
        raise LinkError(f"cannot connect to the broker at {url.netloc}: {e}") from None
    client.loop_start()
    try:
        if not ready.wait(wait_s):
            raise LinkError(f"no answer from the broker at {url.netloc}")
        if refused:
            raise LinkError(f"the broker at {url.netloc} refused us: {refused[0]}")
        if not subscribed.wait(wait_s):
            raise LinkError(f"the broker at {url.netloc} did not confirm the subscription")
        time.sleep(settle_s)  # the broker sends retained messages right after the SUBACK
    finally:
        client.disconnect()
        client.loop_stop()
    return sorted(found)


class MqttLink:
    """The MQTT client: retained round/model topics, updates acked on the device's topic."""

    name = "mqtt"

    def __init__(
        self, url: GatewayURL, device: str, gateway_id: str, auth: MqttAuth, timeout_s: float
    ) -> None:
        self.url, self.device, self.gateway_id = url, device, gateway_id
        self.auth, self.timeout_s = auth, timeout_s
        self._client: Any = None
        self._model_bytes: bytes | None = None
        self._model: Any = None

    def connect(self) -> None:
        from devices.transport_mqtt import MqttDeviceClient, MqttTransportError

        self.close()
        client = MqttDeviceClient(
            self.gateway_id,
            self.device,
            host=self.url.host,
            port=self.url.port,
            username=self.auth.username,
            password=self.auth.password,
            tls_ca=self.auth.tls_ca,
        )
        try:
            client.connect(timeout=self.timeout_s)
        except (MqttTransportError, OSError) as e:
            raise LinkError(str(e)) from None
        self._client = client

    def _call(self, fn: Callable[[], T]) -> T:
        from devices.transport_mqtt import MqttTransportError

        if self._client is None:
            raise LinkError("not connected")
        try:
            return fn()
        except (MqttTransportError, OSError) as e:
            raise LinkError(str(e)) from None

    def round_info(self) -> dict[str, Any]:
        from devices.transport_mqtt import MqttTransportError

        client = self._client
        if client is None:
            raise LinkError("not connected")
        try:
            return dict(client.round_info(timeout=1.0))
        except MqttTransportError as e:
            if client.connected:
                return {"round": None}  # connected, nothing retained yet: no round so far
            raise LinkError(str(e)) from None

    def model(self) -> Any:
        from devices.downlink import DownlinkError
        from devices.model_wire import decode_model

        data = self._call(lambda: self._client.model_bytes(timeout=self.timeout_s))
        if data != self._model_bytes:
            try:
                self._model = decode_model(data)
            except DownlinkError as e:
                raise LinkError(f"model download refused: {e}") from None
            self._model_bytes = data
        return self._model

    def send(self, envelope: bytes) -> Answer:
        ack = self._call(lambda: self._client.send(envelope, timeout=self.timeout_s))
        return Answer(ack.status, ack.reason, ack.detail)

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


# --- training -----------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceOptions:
    """Everything ``tierfl device`` takes (argparse fills it; tests can too)."""

    gateway: str
    device_id: str
    key: Path
    dataset: str
    device_index: int = 0
    num_devices: int = 1
    rounds: int = 1  # 0: until stopped
    codec: str | None = None  # None: what the gateway asks for
    topk_ratio: float = 0.1
    model: str | None = None
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    max_steps: int | None = None
    max_grad_norm: float | None = None  # clip each local SGD step's gradient (None: off)
    seed: int = 0
    alpha: float = 0.5
    gateway_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    tls_ca: Path | None = None
    retries: int = 5
    timeout_s: float = 15.0
    wait_s: float | None = None  # None: wait for a round forever
    poll_s: float = 0.25
    threads: int | None = None
    json: bool = False


class LocalTrainer:
    """The device's shard, its model, and one round of local SGD (torch, imported here)."""

    def __init__(self, opts: DeviceOptions) -> None:
        import torch

        from devices.datasets import load_federated
        from devices.models import build_model, default_model, num_params
        from devices.training import LocalTrainingConfig

        if opts.threads is not None:
            torch.set_num_threads(opts.threads)
        try:
            fed = load_federated(opts.dataset, opts.num_devices, seed=opts.seed, alpha=opts.alpha)
        except (OSError, ValueError) as e:
            raise DeviceError(2, f"--dataset {opts.dataset}: {e}") from None
        self.data = fed.devices[opts.device_index]
        self.model_name = opts.model or default_model(opts.dataset)
        with torch.random.fork_rng(devices=[]):
            self.net = build_model(self.model_name, fed.input_shape, fed.num_classes)
        self.num_params = num_params(self.net)
        self.config = LocalTrainingConfig(
            opts.epochs, opts.batch_size, opts.lr, opts.max_steps, opts.max_grad_norm
        )
        self.seed, self.index = opts.seed, opts.device_index

    @property
    def samples(self) -> int:
        return int(self.data.y_train.shape[0])

    def train(self, params: np.ndarray, round_: int) -> Any:
        from devices.training import train_device

        seed = int(np.random.SeedSequence([self.seed, self.index, round_]).generate_state(1)[0])
        return train_device(
            self.net, params, self.data.x_train, self.data.y_train, self.config, seed
        )


# --- the device loop ----------------------------------------------------------------


class Device:
    """One device's run: connect (with retries), follow rounds, report every verdict."""

    def __init__(self, opts: DeviceOptions, out: Any = None) -> None:
        self.opts = opts
        self.out = out if out is not None else sys.stdout
        self.stop = threading.Event()
        self.url = parse_gateway_url(opts.gateway)
        if self.url.scheme == "mqtts" and opts.tls_ca is None:
            raise ValueError("--tls-ca: required with mqtts:// (the CA that signed the broker)")
        try:
            self.key = load_private_key(opts.key)
        except KeyFileError as e:
            raise ValueError(f"--key: {e}") from None
        self.auth = MqttAuth(opts.username, _read_password(opts.password_file), opts.tls_ca)
        self.link: Link | None = None
        self._discovered: str | None = None  # the MQTT gateway id found on the broker
        self.trainer: LocalTrainer | None = None
        self.feedback: Any = None
        self.delivered = 0
        self.refused = 0

    # reporting
    def _emit(self, record: dict[str, Any], text: str) -> None:
        print(json.dumps(record) if self.opts.json else text, file=self.out, flush=True)

    # transport with retries
    def _backoff(self, attempt: int) -> float:
        return float(min(8.0, 0.5 * 2**attempt))

    def _make_link(self) -> Link:
        if self.url.scheme == "coap":
            return CoapLink(self.url, self.opts.timeout_s)
        gateway_id = self.opts.gateway_id or self.url.gateway_id or self._discovered
        if gateway_id is None:
            found = discover_mqtt_gateways(self.url, self.auth)
            if not found:  # perhaps the gateway is still starting: worth a retry
                raise LinkError(
                    f"no gateway has published a round on the broker at {self.url.netloc} "
                    "(retained tierfl/+/round)"
                )
            if len(found) > 1:
                raise DeviceError(
                    2,
                    f"the broker at {self.url.netloc} serves gateways {', '.join(found)}; "
                    f"name one: {self.url.scheme}://{self.url.netloc}/GATEWAY or --gateway-id",
                )
            gateway_id = self._discovered = found[0]
        return MqttLink(self.url, self.opts.device_id, gateway_id, self.auth, self.opts.timeout_s)

    def _connect(self) -> Link:
        last: Exception | None = None
        for attempt in range(self.opts.retries + 1):
            if self.stop.is_set():
                raise DeviceError(0, "stopped")
            try:
                if self.link is None:
                    self.link = self._make_link()
                self.link.connect()
                return self.link
            except LinkError as e:
                last = e
                if self.link is not None:
                    self.link.close()
                    self.link = None
                if attempt < self.opts.retries:
                    delay = self._backoff(attempt)
                    print(
                        f"gateway {self.url} unreachable ({e}); retry {attempt + 1}/"
                        f"{self.opts.retries} in {delay:g} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.stop.wait(delay)
        raise DeviceError(
            1, f"gateway {self.url} unreachable after {self.opts.retries + 1} attempt(s): {last}"
        )

    def _call(self, fn: Callable[[Link], T]) -> T:
        """``fn(link)``; on a transport failure reconnect (with backoff) and call again.

        Resending after a failure is safe: the same sealed bytes are at most
        answered ``duplicate`` by the gateway.
        """
        failures = 0
        while True:
            link = self.link if self.link is not None else self._connect()
            try:
                return fn(link)
            except LinkError as e:
                failures += 1
                link.close()
                self.link = None
                if failures > self.opts.retries:
                    raise DeviceError(
                        1, f"gateway {self.url} keeps failing ({failures} times): {e}"
                    ) from None
                print(f"link to {self.url} failed ({e}); reconnecting", file=sys.stderr, flush=True)
                self.stop.wait(self._backoff(failures - 1))

    # the rounds
    def run(self) -> int:
        opts = self.opts
        self._connect()
        name = self.link.name if self.link is not None else "?"
        last = -1
        waited_since = time.monotonic()
        while not self.stop.is_set() and (opts.rounds == 0 or self.delivered < opts.rounds):
            info = self._call(lambda link: link.round_info())
            r, base = info.get("round"), info.get("base")
            if not isinstance(r, int) or not info.get("open") or r <= last or not base:
                if opts.wait_s is not None and time.monotonic() - waited_since > opts.wait_s:
                    raise DeviceError(1, f"no open round at {self.url} within {opts.wait_s:g} s")
                self.stop.wait(opts.poll_s)
                continue
            model = self._call(lambda link: link.model())
            if model.hash != base:  # round info ran ahead of the model: fetch again shortly
                self.stop.wait(opts.poll_s)
                continue
            answer, record = self._round(r, model, info, name)
            last = r
            waited_since = time.monotonic()
            self._report(record, answer)
            if answer.ok:
                self.delivered += 1
            elif answer.reason in FATAL_REASONS:
                raise DeviceError(
                    3, f"gateway refused {opts.device_id}: {answer.reason}: {answer.detail}"
                )
            elif answer.reason not in TRANSIENT_REASONS:
                self.delivered += 1
                self.refused += 1
        self._emit(
            {
                "event": "done",
                "device": opts.device_id,
                "delivered": self.delivered,
                "refused": self.refused,
                "stopped": self.stop.is_set(),
            },
            f"{opts.device_id}: done, {self.delivered} round(s), {self.refused} refused"
            + (" (stopped)" if self.stop.is_set() else ""),
        )
        return 3 if self.refused else 0

    def _round(
        self, r: int, model: Any, info: dict[str, Any], transport: str
    ) -> tuple[Answer, dict[str, Any]]:
        from devices.codecs import CODECS
        from devices.compression import ErrorFeedback
        from devices.envelope import Envelope, seal

        opts = self.opts
        if self.trainer is None:
            self.trainer = LocalTrainer(opts)
            t = self.trainer
            self._emit(
                {
                    "event": "start",
                    "device": opts.device_id,
                    "gateway": str(self.url),
                    "model": t.model_name,
                    "dataset": opts.dataset,
                    "shard": [opts.device_index, opts.num_devices],
                    "samples": t.samples,
                },
                f"{opts.device_id}: {t.model_name} on {opts.dataset} shard {opts.device_index}/"
                f"{opts.num_devices} ({t.samples} samples) -> gateway {self.url}",
            )
        trainer = self.trainer
        if model.params.size != trainer.num_params:
            raise DeviceError(
                2,
                f"the gateway serves a model with {model.params.size} parameters, but "
                f"{trainer.model_name} for {opts.dataset} has {trainer.num_params}: "
                "pick the --dataset/--model the gateway's rounds.model was made for",
            )
        codec = opts.codec or str(info.get("encoding") or model.encoding or "f32")
        if codec not in CODECS:
            raise DeviceError(2, f"the gateway asks for codec {codec!r}, unknown here")
        t0 = time.perf_counter()
        result = trainer.train(model.params, r)
        train_s = time.perf_counter() - t0
        params: dict[str, Any] = {"ratio": opts.topk_ratio} if codec.startswith("topk") else {}
        rng = np.random.default_rng([opts.seed, opts.device_index, r, 1])
        if codec == "f32":
            from devices.codecs import encode

            enc = encode("f32", result.delta)
        else:
            if self.feedback is None:
                self.feedback = ErrorFeedback()
            enc = self.feedback.compress(result.delta, codec, rng=rng, **params)
        env = Envelope.new(opts.device_id, r, model.hash, max(1, result.num_samples), [enc])
        data = seal(env, self.key)
        t1 = time.perf_counter()
        answer = self._call(lambda link: link.send(data))
        send_s = time.perf_counter() - t1
        record = {
            "event": "round",
            "device": opts.device_id,
            "round": r,
            "status": answer.status,
            "reason": answer.reason,
            "detail": answer.detail,
            "transport": transport,
            "codec": codec,
            "bytes": len(data),
            "samples": int(result.num_samples),
            "steps": int(result.steps),
            "loss": float(result.loss) if math.isfinite(result.loss) else None,
            "train_s": round(train_s, 4),
            "send_s": round(send_s, 4),
        }
        return answer, record

    def _report(self, record: dict[str, Any], answer: Answer) -> None:
        verdict = answer.status if answer.ok else f"rejected ({answer.reason}: {answer.detail})"
        loss = record["loss"]
        self._emit(
            record,
            f"{record['device']}: round {record['round']}: {verdict} -- {record['bytes']} bytes "
            f"{record['codec']} over {record['transport']}, {record['samples']} samples, "
            f"loss {loss if loss is None else round(loss, 4)}, train {record['train_s']:.2f} s, "
            f"send {record['send_s']:.3f} s",
        )

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None


def _read_password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DeviceError(2, f"--password-file {path}: cannot read: {e}") from None


def run_device(opts: DeviceOptions, out: Any = None) -> int:
    """Run one device until its rounds are done or SIGTERM/SIGINT; the exit code."""
    try:
        _check_options(opts)
        device = Device(opts, out)
    except (ValueError, KeyFileError) as e:  # bad URL, key file, option
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        device.stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        return device.run()
    except DeviceError as e:
        if e.code == 0:
            return 0
        print(f"error: {e}", file=sys.stderr)
        return e.code
    finally:
        device.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _check_options(opts: DeviceOptions) -> None:
    check_device_id(opts.device_id)
    if not 0 <= opts.device_index < opts.num_devices:
        raise ValueError(
            f"--device-index must be in [0, --num-devices = {opts.num_devices}), "
            f"got {opts.device_index}"
        )
    if opts.codec is not None:
        from devices.codecs import CODECS

        if opts.codec not in CODECS:
            raise ValueError(f"--codec: unknown {opts.codec!r} (known: {', '.join(CODECS)})")
    if not 0 < opts.topk_ratio <= 1:
        raise ValueError(f"--topk-ratio must be in (0, 1], got {opts.topk_ratio}")
    if opts.gateway_id is not None:
        check_device_id(opts.gateway_id)


# --- CLI ----------------------------------------------------------------------------


def add_device_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``device`` to an argparse subparsers object (its handler sets ``func``)."""
    from devices.codecs import CODECS  # numpy only

    p = subparsers.add_parser(
        "device",
        help="run a reference device against a real gateway (CoAP or MQTT)",
        description=(
            "A reference device: fetch the gateway's model and round, train on the local shard, "
            "encode, sign and send the update, report the gateway's verdict, and follow rounds "
            "until --rounds are delivered or SIGTERM/SIGINT. Exit 0: done; 1: gateway "
            "unreachable or no round opened within --wait-s; 2: bad arguments or a model that "
            "does not match the gateway's; 3: the gateway refused an update for good."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--gateway",
        required=True,
        metavar="URL",
        help="coap://HOST:PORT, mqtt://HOST:PORT[/GATEWAY] or mqtts://HOST:PORT[/GATEWAY]",
    )
    p.add_argument("--id", dest="device_id", required=True, metavar="ID", help="device id")
    p.add_argument(
        "--key", required=True, type=Path, metavar="FILE", help="private key (tierfl keys new)"
    )
    p.add_argument("--dataset", required=True, choices=("har", "fashion", "digits"))
    p.add_argument(
        "--device-index",
        type=number(int, minimum=0),
        default=0,
        metavar="N",
        help="this device's shard",
    )
    p.add_argument(
        "--num-devices",
        type=number(int, minimum=1),
        default=1,
        metavar="M",
        help="how many shards the dataset is split into",
    )
    p.add_argument(
        "--rounds",
        type=number(int, minimum=0),
        default=1,
        metavar="K",
        help="rounds to deliver (0: until stopped)",
    )
    p.add_argument(
        "--codec",
        choices=tuple(CODECS),
        default=None,
        help="update encoding (default: what the gateway asks for)",
    )
    p.add_argument(
        "--topk-ratio",
        type=positive_float,
        default=0.1,
        help="share of entries a top-k codec keeps",
    )
    p.add_argument(
        "--model",
        choices=("mlp", "cnn1d", "cnn2d"),
        default=None,
        help="model (default: the dataset's)",
    )
    tr = p.add_argument_group("local training")
    tr.add_argument("--epochs", type=number(int, minimum=0), default=1)
    tr.add_argument("--batch-size", type=number(int, minimum=1), default=16)
    tr.add_argument("--lr", type=positive_float, default=0.05)
    tr.add_argument("--max-steps", type=number(int, minimum=0), default=None)
    tr.add_argument(
        "--max-grad-norm",
        type=positive_float,
        default=None,
        help="clip each local SGD step's gradient to this L2 norm (as tierfl emulate does)",
    )
    tr.add_argument(
        "--seed", type=number(int, minimum=0), default=0, help="data split and training seed"
    )
    tr.add_argument(
        "--alpha",
        type=positive_float,
        default=0.5,
        help="Dirichlet label skew of the split (fashion, digits)",
    )
    tr.add_argument(
        "--threads",
        type=number(int, minimum=1),
        default=None,
        help="torch threads (default: torch's choice)",
    )
    ln = p.add_argument_group("link")
    ln.add_argument(
        "--gateway-id",
        default=None,
        metavar="GW",
        help="MQTT: the gateway's id (default: from the URL path, or discovered)",
    )
    ln.add_argument("--username", default=None, help="MQTT user name")
    ln.add_argument(
        "--password-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="MQTT password, read from a file (not the command line)",
    )
    ln.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        metavar="FILE",
        help="MQTT: CA certificate for TLS (mqtts://)",
    )
    ln.add_argument(
        "--retries",
        type=number(int, minimum=0),
        default=5,
        help="reconnection attempts (exponential backoff 0.5 s .. 8 s)",
    )
    ln.add_argument(
        "--timeout-s",
        type=positive_float,
        default=15.0,
        help="how long one request waits for the gateway",
    )
    ln.add_argument(
        "--wait-s",
        type=positive_float,
        default=None,
        help="give up (exit 1) when no round opens for this long (default: wait)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_device)
    return p


def cmd_device(args: argparse.Namespace) -> int:
    fields = DeviceOptions.__dataclass_fields__
    opts = DeviceOptions(**{k: v for k, v in vars(args).items() if k in fields})
    return run_device(opts)
