"""The gateway's CoAP server (aiocoap): model download, round info, update upload, health.

Resources (one class each, mounted on an ``aiocoap.resource.Site``)::

    GET  /model    the model download (devices.model_wire CBOR, content-format 60),
                   block-wise (Block2), ETag, Observe: observers are notified on
                   every publish_model; a GET carrying the current ETag gets 2.03 Valid
    GET  /round    service.round_info() as CBOR; observable (publish and close)
    POST /update   one sealed envelope, block-wise (Block1); 2.04 Changed when accepted
                   (or a duplicate of an accepted one), else the reason's code
    GET  /health   service.health() as CBOR

Reason -> response code (the diagnostic payload is UTF-8 ``"<reason>: <detail>"``,
so a device reads the reason code before the colon)::

    malformed             4.00 Bad Request
    bad-signature         4.01 Unauthorized
    replay                4.01 Unauthorized   (as OSCORE answers "Replay detected", RFC 8613
                                               §7.4: a freshness failure is an authentication
                                               failure, not a permission one)
    unknown-device        4.03 Forbidden
    incomplete            4.08 Request Entity Incomplete
    stale-round           4.09 Conflict       (the device's state conflicts with the
    stale-base            4.09 Conflict        gateway's: fetch /round and /model again)
    too-large             4.13 Request Entity Too Large (with Size1 = the limit)
    bad-shape             4.22 Unprocessable Entity
    non-finite            4.22 Unprocessable Entity
    norm-bound            4.22 Unprocessable Entity
    rate-limited          4.29 Too Many Requests (Max-Age = when to retry)
    round-closed          5.03 Service Unavailable

Block-wise uploads are assembled here, not by aiocoap, because aiocoap (0.4.x)
assembles a Block1 upload in memory before any handler runs, with no size
limit, and keeps the assembly for MAX_TRANSMIT_WAIT (93 s). ``UpdateResource``
answers ``needs_blockwise_assembly() -> False`` and keeps its own bounded
table of partial uploads keyed by (remote address, Request-Tag): at most
``max_partial_uploads`` at a time, each dropped after ``upload_timeout_s``
without a block, each refused with 4.13 as soon as the declared Size1 or the
running total passes the limit. Blocks must arrive in order (RFC 7959 §2.5
allows a server to require that); a gap or an unknown transfer gets 4.08. A
retransmitted block that was already taken is acknowledged again, and the
final answer of a finished upload is remembered for ``upload_timeout_s``, so
late retransmissions get the same answer instead of 4.08.

Memory: aiocoap's message layer remembers every incoming request's response
(for deduplication) for EXCHANGE_LIFETIME, 247 s by default, and each stored
response holds its request, block payload included: ~200 KB per 50 KB upload,
GBs at 60 uploads/s (stock aiocoap measured here: 846 MB after 3,000 uploads,
still growing). :func:`bound_exchange_lifetime` gives incoming messages a
``TransportTuning`` whose EXCHANGE_LIFETIME is ``exchange_lifetime_s`` (10 s by
default: it covers a CON's first two retransmissions, 2-3 s and 6-9 s after
the original; later duplicates are harmless because every block above is
idempotent and a finished upload's answer is replayed), and drops each sent
response's reference to its request, so a remembered exchange costs ~1.8 KB
instead of ~4 KB. Memory of the message layer is then bounded by
rate x blocks per upload x lifetime x 1.8 KB (about 110 MB at 120 uploads/s).

Speed: two shortcuts around aiocoap's request dispatch, each worth more CPU
than our whole Block1 handling: ``_Site`` passes exact-path requests on
without ``Site``'s deep copy, and ``_Context`` names the render task without
``repr``-ing the request. Both fall back to aiocoap's own code for anything
else. The aiocoap internals touched (MessageManager.dispatch_message and
_send_via_transport, Site._find_child_and_pathstripped_message,
Context.render_to_pipe) are those of aiocoap 0.4.x (checked with 0.4.17).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiocoap
import cbor2
from aiocoap import Code, Message, resource
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.constants import TransportTuning
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.pipe import Pipe, error_to_message, run_driving_pipe

from gateway.config import CoapListener
from gateway.service import GatewayService, Outcome

__all__ = [
    "REASON_CODES",
    "CoapGateway",
    "HealthResource",
    "ModelResource",
    "RoundResource",
    "UpdateResource",
    "etag_of",
]

log = logging.getLogger(__name__)

TRANSPORT: Final = "coap"
CBOR: Final = ContentFormat.CBOR

REASON_CODES: Final[dict[str, Code]] = {
    "malformed": Code.BAD_REQUEST,
    "bad-signature": Code.UNAUTHORIZED,
    "replay": Code.UNAUTHORIZED,
    "unknown-device": Code.FORBIDDEN,
    "incomplete": Code.REQUEST_ENTITY_INCOMPLETE,
    "stale-round": Code.CONFLICT,
    "stale-base": Code.CONFLICT,
    "too-large": Code.REQUEST_ENTITY_TOO_LARGE,
    "bad-shape": Code.UNPROCESSABLE_ENTITY,
    "non-finite": Code.UNPROCESSABLE_ENTITY,
    "norm-bound": Code.UNPROCESSABLE_ENTITY,
    "rate-limited": Code.TOO_MANY_REQUESTS,
    "round-closed": Code.SERVICE_UNAVAILABLE,
}

_MAX_SZX: Final = 6  # 1024-byte blocks; 7 is BERT, which exists only over TCP
_MAX_DIAGNOSTIC: Final = 200  # bytes of detail in an error payload (fits one datagram)
_RETRY_AFTER_S: Final = 1  # Max-Age on 4.29 when intake capacity is full


def etag_of(version: str) -> bytes:
    """The CoAP ETag of a model version: the first 8 bytes of its SHA-256 (ETags are 1-8 bytes)."""
    return bytes.fromhex(version[:16])


def _diagnostic(reason: str, detail: str) -> bytes:
    text = f"{reason}: {detail}".encode()
    return text if len(text) <= _MAX_DIAGNOSTIC else text[: _MAX_DIAGNOSTIC - 3] + b"..."


def outcome_message(outcome: Outcome) -> Message:
    """The response to a finished upload: 2.04 on accept/duplicate, else the reason's code."""
    if outcome.ok:
        return Message(code=Code.CHANGED, payload=outcome.status.encode())
    reason = outcome.reason or "malformed"
    msg = Message(code=REASON_CODES[reason], payload=_diagnostic(reason, outcome.detail))
    if reason == "rate-limited":
        msg.opt.max_age = _RETRY_AFTER_S
    return msg


# --- /update ------------------------------------------------------------------------


@dataclass
class _Upload:
    """One block-wise upload in progress."""

    buf: bytearray = field(default_factory=bytearray)  # the bytes so far, in order
    last_seen: float = 0.0


@dataclass(frozen=True)
class _Finished:
    """The answer to the last block of a finished upload, kept for late retransmissions."""

    block: int
    code: Code
    payload: bytes
    max_age: int | None
    at: float


class UpdateResource(resource.Resource):
    """POST /update: bounded block-wise assembly, then ``service.submit``."""

    def __init__(
        self,
        service: GatewayService,
        *,
        max_partial_uploads: int = 256,
        upload_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.service = service
        self.max_partial = max_partial_uploads
        self.timeout = upload_timeout_s
        self.clock = clock
        self._uploads: OrderedDict[tuple[Any, ...], _Upload] = OrderedDict()  # LRU by activity
        self._finished: OrderedDict[tuple[Any, ...], _Finished] = OrderedDict()
        self.expired = 0  # partial uploads dropped for inactivity
        self._sweep_every = min(1.0, upload_timeout_s / 4)
        self._next_sweep = 0.0
        self._transfers = service.metrics.transfers.labels(service.gateway_id, TRANSPORT)
        self._gauge_value = -1
        self.blocks_received = 0

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return False  # aiocoap's assembly has no size limit: we do it ourselves

    @property
    def partial_uploads(self) -> int:
        return len(self._uploads)

    def _expire(self, now: float, *, force: bool = False) -> None:
        """Drop uploads idle for ``upload_timeout_s`` (counted ``incomplete``) and old answers.

        Cheap enough per block, but only sweeps every ``_sweep_every`` seconds
        unless forced (the periodic sweeper, or a full table).
        """
        if not force and now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_every
        cutoff = now - self.timeout
        while self._uploads:
            key, up = next(iter(self._uploads.items()))
            if up.last_seen >= cutoff:
                break
            del self._uploads[key]
            self.expired += 1
            self.service.reject(
                "incomplete",
                f"upload stalled at byte {len(up.buf)} for {self.timeout:g} s",
                TRANSPORT,
            )
        while self._finished:
            key, fin = next(iter(self._finished.items()))
            if fin.at >= cutoff and len(self._finished) <= 4 * self.max_partial:
                break
            del self._finished[key]
        self._gauge()

    def _gauge(self) -> None:
        n = len(self._uploads)
        if n != self._gauge_value:
            self._gauge_value = n
            self._transfers.set(n)

    def _refuse(self, reason: str, detail: str) -> Message:
        msg = outcome_message(self.service.reject(reason, detail, TRANSPORT))
        if reason == "too-large":
            msg.opt.size1 = self.service.max_update_bytes
        return msg

    async def render_post(self, request: Message) -> Message:
        now = self.clock()
        self._expire(now)
        try:
            return self._post(request, now)
        finally:
            self._gauge()

    def _post(self, request: Message, now: float) -> Message:
        limit = self.service.max_update_bytes
        size1 = request.opt.size1
        block1 = request.opt.block1
        if block1 is None:  # the whole envelope in one datagram
            if len(request.payload) > limit:
                return self._refuse("too-large", f"{len(request.payload)} bytes > {limit}")
            return outcome_message(self.service.submit(request.payload, TRANSPORT))

        self.blocks_received += 1
        key = (request.remote.blockwise_key, tuple(request.opt.request_tag))
        num, more, szx = block1.block_number, block1.more, block1.size_exponent
        payload = request.payload
        if szx > _MAX_SZX:
            self._uploads.pop(key, None)
            return self._refuse("malformed", "Block1 SZX 7 (BERT) is not allowed over UDP")
        size = 1 << (szx + 4)
        if (more and len(payload) != size) or len(payload) > size:
            self._uploads.pop(key, None)
            return self._refuse(
                "malformed", f"block {num} carries {len(payload)} bytes, Block1 says {size}"
            )
        if size1 is not None and size1 > limit:
            self._uploads.pop(key, None)
            return self._refuse("too-large", f"declared Size1 {size1} bytes > {limit}")

        if num == 0:
            self._finished.pop(key, None)
            up = self._uploads.pop(key, None)  # a restart replaces an unfinished upload
            if up is None and len(self._uploads) >= self.max_partial:
                self._expire(now, force=True)
            if up is None and len(self._uploads) >= self.max_partial:
                return self._refuse(
                    "rate-limited", f"{self.max_partial} block-wise uploads already in progress"
                )
            up = _Upload()
        else:
            up = self._uploads.pop(key, None)
            if up is None:
                fin = self._finished.get(key)
                if fin is not None and fin.block == num and not more:
                    return self._replay_finished(fin, block1)  # a late retransmission
                return self._refuse(
                    "incomplete", f"block {num} of an upload whose start was not seen (or expired)"
                )
        offset = num * size
        end = offset + len(payload)
        if end > limit:
            return self._refuse("too-large", f"upload passes {limit} bytes at block {num}")
        if offset < len(up.buf) and more and end <= len(up.buf):
            # a retransmission of a block we already have: acknowledge it again
            up.last_seen = now
            self._uploads[key] = up
            return self._continue(block1)
        if offset != len(up.buf):
            return self._refuse(
                "incomplete", f"block {num} starts at byte {offset}, expected {len(up.buf)}"
            )
        up.buf += payload
        up.last_seen = now
        if more:
            self._uploads[key] = up
            return self._continue(block1)
        response = outcome_message(self.service.submit(bytes(up.buf), TRANSPORT))
        response.opt.block1 = (num, False, szx)
        self._finished[key] = _Finished(
            num, response.code, response.payload, response.opt.max_age, now
        )
        return response

    @staticmethod
    def _continue(block1: Any) -> Message:
        msg = Message(code=Code.CONTINUE)
        msg.opt.block1 = (block1.block_number, True, block1.size_exponent)
        return msg

    @staticmethod
    def _replay_finished(fin: _Finished, block1: Any) -> Message:
        msg = Message(code=fin.code, payload=fin.payload)
        msg.opt.block1 = (block1.block_number, False, block1.size_exponent)
        if fin.max_age is not None:
            msg.opt.max_age = fin.max_age
        return msg


# --- /model, /round, /health --------------------------------------------------------


class ModelResource(resource.ObservableResource):
    """GET /model: Block2 served from the one shared payload (no per-client copies)."""

    def __init__(self, service: GatewayService) -> None:
        super().__init__()
        self.service = service

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return False  # slicing one immutable payload is cheaper than aiocoap's per-client cache

    async def render_get(self, request: Message) -> Message:
        try:
            payload, version = self.service.model_payload()
        except LookupError:
            return Message(code=Code.SERVICE_UNAVAILABLE, payload=b"no model published yet")
        etag = etag_of(version)
        if etag in request.opt.etags and request.opt.block2 is None:
            msg = Message(code=Code.VALID)
            msg.opt.etag = etag
            return msg
        block2 = request.opt.block2
        num, szx = (0, _MAX_SZX) if block2 is None else (block2.block_number, block2.size_exponent)
        szx = min(szx, _MAX_SZX)
        size = 1 << (szx + 4)
        msg = Message(code=Code.CONTENT, content_format=CBOR)
        msg.opt.etag = etag
        if block2 is None and len(payload) <= size:
            msg.payload = payload
            return msg
        start = num * size
        if start >= len(payload):
            return Message(code=Code.BAD_OPTION, payload=b"Block2 beyond the end of the model")
        end = min(start + size, len(payload))
        msg.payload = payload[start:end]
        msg.opt.block2 = (num, end < len(payload), szx)
        if num == 0:
            msg.opt.size2 = len(payload)
        return msg


class RoundResource(resource.ObservableResource):
    """GET /round: the round in progress (CBOR); observers hear of publishes and closes."""

    def __init__(self, service: GatewayService) -> None:
        super().__init__()
        self.service = service

    async def render_get(self, request: Message) -> Message:
        return Message(payload=cbor2.dumps(self.service.round_info()), content_format=CBOR)


class HealthResource(resource.Resource):
    """GET /health: liveness and counters (CBOR)."""

    def __init__(self, service: GatewayService, extra: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.service = service
        self.extra = extra

    async def render_get(self, request: Message) -> Message:
        doc = {**self.service.health(), **self.extra()}
        return Message(payload=cbor2.dumps(doc), content_format=CBOR)


# --- the server ---------------------------------------------------------------------


class _ServerTuning(TransportTuning):
    """Default CoAP tuning with a shorter EXCHANGE_LIFETIME (the dedup cache's lifetime)."""

    def __init__(self, exchange_lifetime_s: float) -> None:
        self._exchange_lifetime_s = exchange_lifetime_s

    @property  # type: ignore[override]
    def EXCHANGE_LIFETIME(self) -> float:  # aiocoap's name
        return self._exchange_lifetime_s


def bound_exchange_lifetime(context: aiocoap.Context, lifetime_s: float) -> int:
    """Make ``context``'s message layer forget incoming exchanges after ``lifetime_s``.

    aiocoap reads the lifetime from each incoming message's ``transport_tuning``
    (a fresh default ``TransportTuning`` per decoded datagram); this wraps each
    MessageManager's ``dispatch_message`` to give incoming messages ours.
    Returns how many message managers were wrapped (0 means the aiocoap
    internals moved, and memory is bounded only by aiocoap's defaults).
    """
    tuning = _ServerTuning(lifetime_s)
    wrapped = 0
    for ri in context.request_interfaces:
        mman = getattr(ri, "token_interface", None)
        if not isinstance(mman, MessageManager):
            continue
        dispatch_original = mman.dispatch_message
        send_original = mman._send_via_transport

        def dispatch(
            message: Message, _original: Callable[[Message], None] = dispatch_original
        ) -> None:
            message.transport_tuning = tuning
            _original(message)

        def send(message: Message, _original: Callable[[Message], None] = send_original) -> None:
            _original(message)
            # The response now sits in the dedup cache for EXCHANGE_LIFETIME, and
            # through .request it would keep the whole request (block payload,
            # options, address objects) alive too; a resent duplicate needs none of it.
            if message.code.is_response():
                message.request = None

        mman.dispatch_message = dispatch  # type: ignore[method-assign]
        mman._send_via_transport = send  # type: ignore[method-assign]
        wrapped += 1
    if not wrapped:
        log.warning("aiocoap internals changed: EXCHANGE_LIFETIME is not bounded")
    return wrapped


class _Site(resource.Site):
    """A Site that hands exact-path requests to the resource as they are.

    ``Site`` copies every request to strip its Uri-Path before dispatch, and
    ``Message.copy`` deep-copies all options: ~190 µs per block, more than the
    rest of a block's handling. Our resources never read the path, so an
    exact match is passed through uncopied; anything else goes the stock way.
    """

    def _find_child_and_pathstripped_message(self, request: Message) -> tuple[Any, Message]:
        child = self._resources.get(request.opt.uri_path)
        if child is not None:
            return child, request
        return super()._find_child_and_pathstripped_message(request)  # type: ignore[no-any-return]


class _Context(aiocoap.Context):
    """aiocoap's Context, minus an eager ``repr`` of every request (a task name, ~60 µs/block)."""

    def render_to_pipe(self, pipe: Pipe) -> None:
        run_driving_pipe(
            error_to_message(pipe, self.log), self._render_to_pipe(pipe), name="coap render"
        )


class CoapGateway:
    """A running CoAP endpoint for one :class:`GatewayService` (``start``/``stop`` on a loop)."""

    def __init__(self, service: GatewayService, listener: CoapListener | None = None) -> None:
        self.service = service
        self.listener = listener if listener is not None else service.config.coap
        lst = self.listener
        self.updates = UpdateResource(
            service,
            max_partial_uploads=lst.max_partial_uploads,
            upload_timeout_s=lst.upload_timeout_s,
        )
        self.model = ModelResource(service)
        self.round = RoundResource(service)
        self.health = HealthResource(service, self._transport_health)
        self.site = _Site()
        self.site.add_resource(["model"], self.model)
        self.site.add_resource(["round"], self.round)
        self.site.add_resource(["update"], self.updates)
        self.site.add_resource(["health"], self.health)
        self.site.add_resource(
            [".well-known", "core"], resource.WKCResource(self.site.get_resources_as_linkheader)
        )
        self.context: aiocoap.Context | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        service.subscribe(self._on_change)

    def _transport_health(self) -> dict[str, Any]:
        return {"coap_partial_uploads": self.updates.partial_uploads}

    async def start(self) -> tuple[str, int]:
        """Bind and serve; returns the bound (host, port) (port 0 in the config = any free)."""
        self._loop = asyncio.get_running_loop()
        host, port = self.listener.host, self.listener.port
        self.context = await _Context.create_server_context(
            self.site, bind=(host, port), transports=["udp6"], loggername="tierfl.coap"
        )
        bound_exchange_lifetime(self.context, self.listener.exchange_lifetime_s)
        self._sweeper = asyncio.create_task(self._sweep(), name="coap upload sweeper")
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server is bound to."""
        assert self.context is not None, "not started"
        for ri in self.context.request_interfaces:
            mman = getattr(ri, "token_interface", None)
            transport = getattr(getattr(mman, "message_interface", None), "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                return self.listener.host, int(sock.getsockname()[1])
        raise RuntimeError("no UDP transport in the CoAP context")

    async def _sweep(self) -> None:
        """Expire stalled uploads even when no new block arrives to trigger it."""
        period = max(0.5, self.listener.upload_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            self.updates._expire(self.updates.clock(), force=True)

    async def stop(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self.context is not None:
            await self.context.shutdown()
            self.context = None

    def _on_change(self, event: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if event == "model":
            loop.call_soon_threadsafe(self.model.updated_state)
            deadline = self.service.round_info()["deadline"]
            loop.call_soon_threadsafe(self._schedule_deadline, deadline)
        loop.call_soon_threadsafe(self.round.updated_state)

    def _schedule_deadline(self, deadline: float | None) -> None:
        """Tell /round observers when the round closes by its deadline (no one calls us then)."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if deadline is None or self._loop is None:
            return
        delay = deadline - self.service.clock() + 0.01
        if 0 < delay < 7 * 86400:
            self._deadline_timer = self._loop.call_later(delay, self.round.updated_state)

    async def __aenter__(self) -> CoapGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
