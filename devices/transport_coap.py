"""A device's CoAP link to its gateway (aiocoap client): model, round, block-wise upload.

Gateway-independent (it speaks only the wire formats of ``devices.envelope``
and ``devices.model_wire``), used by the reference device and the emulator.

Two aiocoap facts shape it:

- aiocoap's client keeps at most one outstanding confirmable request per
  server per context (NSTART = 1), so requests of many devices sharing one
  context are serialized at the message layer; emulate many devices with a
  context each (or accept that throughput).
- without a Request-Tag option (RFC 9175), two block-wise uploads from one
  socket are indistinguishable to the server and get mixed. Every upload here
  carries a fresh random Request-Tag, so sharing a context is *correct*.

Replies come back as :class:`CoapReply` ``(code, payload)`` with the code as a
dotted string (``"2.04"``); the gateway's error payload is
``"<reason>: <detail>"``, so :attr:`CoapReply.reason` is the rejection reason
code. Transport failures (timeouts, unreachable) raise :class:`CoapLinkError`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from typing import Any, NamedTuple

import aiocoap
import cbor2
from aiocoap import Code, Message

from devices.model_wire import ModelDownload, decode_model

__all__ = ["CoapDeviceClient", "CoapLinkError", "CoapReply"]

_REQUEST_TAG_BYTES = 4


class CoapLinkError(ConnectionError):
    """The gateway could not be reached, or did not answer in time."""


class CoapReply(NamedTuple):
    """A gateway's answer: ``code`` like ``"2.04"``, and the payload bytes."""

    code: str
    payload: bytes

    @property
    def ok(self) -> bool:
        """2.xx (an update was accepted, or was a duplicate of an accepted one)."""
        return self.code.startswith("2.")

    @property
    def reason(self) -> str | None:
        """The rejection reason code of an error reply (the diagnostic before ``":"``)."""
        if self.ok:
            return None
        head = self.payload.split(b":", 1)[0]
        return head.decode("ascii", "replace") or None


def _dotted(code: Code) -> str:
    return "{}.{:02d}".format(*divmod(int(code), 32))


class CoapDeviceClient:
    """CoAP requests to one gateway base URI, e.g. ``coap://[2001:db8::1]:5683``.

    ``async with CoapDeviceClient(uri) as gw: model = await gw.fetch_model()``.
    Pass ``context`` to share one aiocoap client context between devices (it is
    then not shut down by :meth:`close`). ``block_szx`` (4..6) sets the
    block size ``2**(szx+4)`` of uploads and downloads (6 = 1024 bytes).
    """

    def __init__(
        self,
        base_uri: str,
        *,
        context: aiocoap.Context | None = None,
        timeout_s: float = 60.0,
        block_szx: int = 6,
    ) -> None:
        if not 0 <= block_szx <= 6:
            raise ValueError(f"block_szx must be in [0, 6] (16..1024-byte blocks), got {block_szx}")
        self.base_uri = base_uri.rstrip("/")
        self.timeout_s = timeout_s
        self.block_szx = block_szx
        self._context = context
        self._own_context = context is None
        self.model: ModelDownload | None = None  # the last model fetched

    async def open(self) -> CoapDeviceClient:
        if self._context is None:
            self._context = await aiocoap.Context.create_client_context(transports=["udp6"])
        return self

    async def close(self) -> None:
        if self._own_context and self._context is not None:
            await self._context.shutdown()
        self._context = None

    async def __aenter__(self) -> CoapDeviceClient:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- requests ---------------------------------------------------------------------

    async def _request(self, msg: Message, what: str) -> Message:
        if self._context is None:
            await self.open()
        assert self._context is not None
        if self.block_szx < 6:
            await self._context.find_remote_and_interface(msg)
            msg.remote.maximum_block_size_exp = self.block_szx
        try:
            return await asyncio.wait_for(
                self._context.request(msg).response, timeout=self.timeout_s
            )
        except TimeoutError:
            raise CoapLinkError(f"{what}: no answer within {self.timeout_s:g} s") from None
        except aiocoap.error.NetworkError as e:
            raise CoapLinkError(f"{what}: {e}") from None

    async def request(
        self, method: Code, path: str, payload: bytes = b"", **options: Any
    ) -> CoapReply:
        """Any request to ``base_uri/path`` (block-wise both ways as needed)."""
        uri = f"{self.base_uri}/{path.lstrip('/')}"
        msg = Message(code=method, uri=uri, payload=payload, **options)
        res = await self._request(msg, f"{method} {uri}")
        return CoapReply(_dotted(res.code), res.payload)

    async def post_update(self, envelope: bytes) -> CoapReply:
        """POST a sealed envelope to ``/update``, block-wise, under a fresh Request-Tag."""
        uri = f"{self.base_uri}/update"
        msg = Message(code=Code.POST, uri=uri, payload=envelope)
        msg.opt.request_tag = [os.urandom(_REQUEST_TAG_BYTES)]
        res = await self._request(msg, f"POST {uri}")
        return CoapReply(_dotted(res.code), res.payload)

    async def get_round(self) -> dict[str, Any]:
        """The gateway's round info (``round``, ``deadline``, ``encoding``, ``base``, ``open``)."""
        reply = await self.request(Code.GET, "round")
        if reply.code != "2.05":
            raise CoapLinkError(f"GET /round: {reply.code} {reply.payload[:100]!r}")
        doc = cbor2.loads(reply.payload)
        if not isinstance(doc, dict):
            raise CoapLinkError("GET /round: expected a CBOR map")
        return doc

    async def fetch_model(self) -> ModelDownload:
        """The current model (block-wise); verified against its hash.

        If the model held from a previous fetch is still current, the gateway
        answers 2.03 Valid to its ETag and nothing is downloaded again.
        """
        msg = Message(code=Code.GET, uri=f"{self.base_uri}/model")
        if self.model is not None:
            msg.opt.etags = [bytes.fromhex(self.model.hash[:16])]
        res = await self._request(msg, f"GET {self.base_uri}/model")
        return self._take_model(res)

    def _take_model(self, res: Message) -> ModelDownload:
        if res.code == Code.VALID and self.model is not None:
            return self.model
        if res.code != Code.CONTENT:
            raise CoapLinkError(f"GET /model: {_dotted(res.code)} {res.payload[:100]!r}")
        self.model = decode_model(res.payload)
        return self.model

    async def watch_model(self) -> AsyncGenerator[ModelDownload, None]:
        """Observe ``/model``: yields the current model, then each newly published one."""
        if self._context is None:
            await self.open()
        assert self._context is not None
        msg = Message(code=Code.GET, uri=f"{self.base_uri}/model", observe=0)
        req = self._context.request(msg)
        try:
            first = await asyncio.wait_for(req.response, timeout=self.timeout_s)
            yield self._take_model(first)
            if req.observation is None:
                return
            async for notification in req.observation:
                yield self._take_model(notification)
        finally:
            if req.observation is not None and not req.observation.cancelled:
                req.observation.cancel()
