"""The CoAP gateway over real loopback UDP: aiocoap server, aiocoap and libcoap clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import numpy as np
import pytest
from aiocoap import Code, Message
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.codecs import Encoded, encode
from devices.envelope import Envelope, seal
from devices.keys import DeviceRegistry
from devices.model_wire import decode_model
from devices.transport_coap import CoapDeviceClient, CoapReply
from gateway.coap import REASON_CODES, CoapGateway, etag_of
from gateway.config import CoapListener, GatewayConfig, Limits
from gateway.service import GatewayService

SHAPES = [(40, 25), (25,)]
NUM_PARAMS = 1025  # ~4.3 KB envelopes: 5 blocks of 1024 bytes, 69 of 64
ROUND = 7
KEYS = {f"d{i:02d}": Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(40)}
MODEL = np.linspace(-1, 1, NUM_PARAMS, dtype=np.float32)


def delta(scale: float = 0.01) -> np.ndarray:
    return (np.arange(NUM_PARAMS, dtype=np.float32) % 13 - 6) * np.float32(scale)


def envelope(
    svc: GatewayService,
    device: str,
    *,
    key: Ed25519PrivateKey | None = None,
    tensors: list[Encoded] | None = None,
    **over: Any,
) -> bytes:
    info = svc.round_info()
    fields: dict[str, Any] = {
        "version": 1,
        "device": device,
        "round": info["round"],
        "base": info["base"],
        "nonce": os.urandom(16),
        "timestamp": svc.clock(),
        "samples": 8,
        "tensors": tensors if tensors is not None else [encode("f32", delta())],
    }
    fields.update(over)
    return seal(Envelope(**fields), key or KEYS[device])


class Gateway:
    """A started CoAP gateway and one device-side client, inside one event loop."""

    def __init__(self, svc: GatewayService, coap: CoapGateway, port: int) -> None:
        self.svc, self.coap, self.port = svc, coap, port
        self.uri = f"coap://127.0.0.1:{port}"
        self.client = CoapDeviceClient(self.uri, timeout_s=10)
        self._next = 20  # devices d20.. are for "a good update right after"

    async def good_update_accepted(self) -> None:
        device = f"d{self._next:02d}"
        self._next += 1
        reply = await self.client.post_update(envelope(self.svc, device))
        assert reply == CoapReply("2.04", b"accepted"), reply

    async def raw_block(
        self, ctx: aiocoap.Context, num: int, more: bool, payload: bytes, tag: bytes, **opt: Any
    ) -> Message:
        """One hand-made Block1 request (no aiocoap block-wise handling)."""
        msg = Message(code=Code.POST, uri=f"{self.uri}/update", payload=payload)
        msg.opt.block1 = (num, more, 6)
        msg.opt.request_tag = [tag]
        for k, v in opt.items():
            setattr(msg.opt, k, v)
        return await ctx.request(msg, handle_blockwise=False).response


@contextlib.asynccontextmanager
async def running(**coap: Any) -> AsyncIterator[Gateway]:
    registry = DeviceRegistry({d: k.public_key() for d, k in KEYS.items()})
    cfg = GatewayConfig(
        id="gw-t",
        coap=CoapListener(host="127.0.0.1", port=0, **coap),
        limits=Limits(norm_bound=100.0),
    )
    svc = GatewayService("gw-t", registry, SHAPES, cfg)
    svc.publish_model(MODEL, ROUND, deadline_s=600)
    gw = CoapGateway(svc)
    _, port = await gw.start()
    g = Gateway(svc, gw, port)
    try:
        await g.client.open()
        yield g
    finally:
        await g.client.close()
        await gw.stop()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


# --- acceptance, duplicates -------------------------------------------------------------


def test_signed_update_is_accepted_blockwise_and_duplicates_count_once() -> None:
    async def scenario() -> None:
        async with running() as g:
            data = envelope(g.svc, "d00")
            assert len(data) > 4 * 1024  # really block-wise
            assert await g.client.post_update(data) == ("2.04", b"accepted")
            assert await g.client.post_update(data) == ("2.04", b"duplicate")
            m = g.svc.metrics
            assert m.updates_count("gw-t", "accepted", "coap") == 1
            assert m.updates_count("gw-t", "duplicate", "coap") == 1
            agg = g.svc.close_round()
            assert agg.count == 1 and agg.devices == ["d00"]
            np.testing.assert_allclose(agg.weighted_sum, 8 * delta(), rtol=1e-6)

    run(scenario)


def test_concurrent_uploads_sharing_one_context_do_not_mix() -> None:
    async def scenario() -> None:
        async with running() as g:
            datas = [envelope(g.svc, f"d{i:02d}") for i in range(8)]
            replies = await asyncio.gather(*(g.client.post_update(d) for d in datas))
            assert all(r == ("2.04", b"accepted") for r in replies), replies
            assert g.svc.close_round().count == 8

    run(scenario)


# --- each bad input over the socket: its code and reason, then a good update -------------


def _bad_sig(svc: GatewayService) -> bytes:
    data = bytearray(envelope(svc, "d01"))
    data[-1] ^= 0x01
    return bytes(data)


def _nan(svc: GatewayService) -> bytes:
    x = delta()
    x[100] = np.nan
    return envelope(svc, "d01", tensors=[Encoded("f32", (NUM_PARAMS,), x.tobytes(), {})])


def _replay(svc: GatewayService) -> bytes:
    nonce = os.urandom(16)
    assert svc.submit(envelope(svc, "d02", nonce=nonce), "local").ok
    return envelope(svc, "d02", nonce=nonce, samples=9)


def _second_update_same_round(svc: GatewayService) -> bytes:
    assert svc.submit(envelope(svc, "d04"), "local").ok
    return envelope(svc, "d04")


def _closed(svc: GatewayService) -> bytes:
    data = envelope(svc, "d05")
    svc.close_round()
    return data


BAD: list[tuple[str, Callable[[GatewayService], bytes]]] = [
    ("malformed", lambda svc: b"\xa9garbage, not an envelope"),
    ("malformed", lambda svc: envelope(svc, "d01")[:-10]),
    ("bad-signature", _bad_sig),
    ("unknown-device", lambda svc: envelope(svc, "stranger", key=KEYS["d01"])),
    ("replay", _replay),
    ("stale-round", lambda svc: envelope(svc, "d01", round=ROUND - 1)),
    ("stale-base", lambda svc: envelope(svc, "d01", base="ab" * 32)),
    ("bad-shape", lambda svc: envelope(svc, "d01", tensors=[encode("f32", delta()[:900])])),
    ("non-finite", _nan),
    ("norm-bound", lambda svc: envelope(svc, "d01", tensors=[encode("f32", delta(100.0))])),
    ("rate-limited", _second_update_same_round),
    ("round-closed", _closed),
]


@pytest.mark.parametrize(("reason", "make"), BAD, ids=[r for r, _ in BAD])
def test_each_rejection_gets_its_code_and_reason(
    reason: str, make: Callable[[GatewayService], bytes]
) -> None:
    async def scenario() -> None:
        async with running() as g:
            reply = await g.client.post_update(make(g.svc))
            assert reply.code == REASON_CODES[reason].dotted, reply
            assert reply.reason == reason, reply
            assert len(reply.payload) <= 200
            assert g.svc.metrics.rejections_count("gw-t", reason, "coap") == 1
            if reason == "round-closed":  # a new round must open before anything is accepted
                g.svc.publish_model(MODEL + 1, ROUND + 1, deadline_s=600)
            await g.good_update_accepted()

    run(scenario)


def test_codes_of_the_mapping() -> None:
    assert {r: c.dotted for r, c in REASON_CODES.items()} == {
        "malformed": "4.00",
        "bad-signature": "4.01",
        "replay": "4.01",
        "unknown-device": "4.03",
        "incomplete": "4.08",
        "stale-round": "4.09",
        "stale-base": "4.09",
        "too-large": "4.13",
        "bad-shape": "4.22",
        "non-finite": "4.22",
        "norm-bound": "4.22",
        "rate-limited": "4.29",
        "round-closed": "5.03",
    }


def test_too_large_is_refused_early_without_assembling_everything() -> None:
    async def scenario() -> None:
        async with running() as g:
            limit = g.svc.max_update_bytes
            big = os.urandom(20 * 1024)
            ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
            try:
                # declared Size1 over the limit: refused at block 0, Size1 says the limit
                res = await g.raw_block(ctx, 0, True, big[:1024], b"t1", size1=len(big))
                assert res.code == Code.REQUEST_ENTITY_TOO_LARGE, res
                assert res.opt.size1 == limit and res.payload.startswith(b"too-large:")
                # no Size1: refused at the block that crosses the limit, not at the end
                first_over = limit // 1024
                for num in range(20):
                    res = await g.raw_block(
                        ctx, num, True, big[num * 1024 : (num + 1) * 1024], b"t2"
                    )
                    if num < first_over:
                        assert res.code == Code.CONTINUE, (num, res)
                    else:
                        assert res.code == Code.REQUEST_ENTITY_TOO_LARGE, (num, res)
                        break
                assert num == first_over < 19
                assert g.coap.updates.partial_uploads == 0  # nothing of it is kept
                # the rest of that upload is unknown now
                res = await g.raw_block(ctx, num + 1, True, big[:1024], b"t2")
                assert res.code == Code.REQUEST_ENTITY_INCOMPLETE
                # aiocoap's own client gets the 4.13 on its first block too
                reply = await g.client.post_update(big)
                assert (reply.code, reply.reason) == ("4.13", "too-large")
            finally:
                await ctx.shutdown()
            assert g.svc.metrics.rejections_count("gw-t", "too-large", "coap") == 3
            await g.good_update_accepted()

    run(scenario)


def test_missing_blocks_get_4_08_and_stalled_uploads_expire() -> None:
    async def scenario() -> None:
        async with running(upload_timeout_s=0.6) as g:
            data = envelope(g.svc, "d06")
            ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
            try:
                assert (await g.raw_block(ctx, 0, True, data[:1024], b"m1")).code == Code.CONTINUE
                res = await g.raw_block(ctx, 2, True, data[2048:3072], b"m1")  # block 1 missing
                assert res.code == Code.REQUEST_ENTITY_INCOMPLETE
                assert res.payload.startswith(b"incomplete:")
                # a block of an upload that never started
                res = await g.raw_block(ctx, 3, False, data[3072:4096], b"m2")
                assert res.code == Code.REQUEST_ENTITY_INCOMPLETE
                # a retransmitted block is acknowledged again; the upload still completes
                for num in (0, 1, 1, 2, 3):
                    chunk = data[num * 1024 : (num + 1) * 1024]
                    assert (await g.raw_block(ctx, num, True, chunk, b"m3")).code == Code.CONTINUE
                res = await g.raw_block(ctx, 4, False, data[4096:], b"m3")
                assert (res.code, res.payload) == (Code.CHANGED, b"accepted")
                # ... and a late retransmission of its last block gets the same answer
                res = await g.raw_block(ctx, 4, False, data[4096:], b"m3")
                assert (res.code, res.payload) == (Code.CHANGED, b"accepted")
                # a stalled upload is dropped after upload_timeout_s and counted
                assert (await g.raw_block(ctx, 0, True, data[:1024], b"m4")).code == Code.CONTINUE
                assert g.coap.updates.partial_uploads == 1
                await asyncio.sleep(1.5)
                assert g.coap.updates.partial_uploads == 0
            finally:
                await ctx.shutdown()
            assert g.svc.metrics.rejections_count("gw-t", "incomplete", "coap") == 3
            assert g.svc.health()["accepted"] == 1
            await g.good_update_accepted()

    run(scenario)


def test_partial_uploads_are_bounded() -> None:
    async def scenario() -> None:
        async with running(max_partial_uploads=2) as g:
            ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
            try:
                block = os.urandom(1024)
                for tag in (b"a", b"b"):
                    assert (await g.raw_block(ctx, 0, True, block, tag)).code == Code.CONTINUE
                res = await g.raw_block(ctx, 0, True, block, b"c")
                assert res.code == Code.TOO_MANY_REQUESTS and res.opt.max_age is not None
                assert res.payload.startswith(b"rate-limited:")
                # restarting an upload in progress does not need a new slot
                assert (await g.raw_block(ctx, 0, True, block, b"a")).code == Code.CONTINUE
            finally:
                await ctx.shutdown()

    run(scenario)


# --- model, round, health ----------------------------------------------------------------


def test_model_download_blockwise_with_etag_and_observe() -> None:
    async def scenario() -> None:
        async with running() as g:
            payload, version = g.svc.model_payload()
            assert len(payload) > 4 * 1024
            model = await g.client.fetch_model()
            np.testing.assert_array_equal(model.params, MODEL)
            assert model.hash == version and model.round == ROUND and model.shapes == SHAPES
            # the raw response carries the ETag; a second fetch is answered 2.03 Valid
            res = await g.client._request(Message(code=Code.GET, uri=f"{g.uri}/model"), "GET")
            assert res.payload == payload and res.opt.etag == etag_of(version)
            res = await g.client._request(
                Message(code=Code.GET, uri=f"{g.uri}/model", etags=[etag_of(version)]), "GET"
            )
            assert res.code == Code.VALID and res.payload == b""
            assert await g.client.fetch_model() is model

            watcher = CoapDeviceClient(g.uri, timeout_s=10)
            async with watcher:
                updates = watcher.watch_model()
                first = await anext(updates)
                assert first.hash == version
                new_params = MODEL * 2
                new_version = g.svc.publish_model(new_params, ROUND + 1, deadline_s=60)
                second = await asyncio.wait_for(anext(updates), 10)
                assert second.hash == new_version and second.round == ROUND + 1
                np.testing.assert_array_equal(second.params, new_params)
                await updates.aclose()

            info = await g.client.get_round()
            assert info["round"] == ROUND + 1 and info["base"] == new_version and info["open"]
            reply = await g.client.request(Code.GET, "health")
            health = cbor2.loads(reply.payload)
            assert health["gateway"] == "gw-t" and health["coap_partial_uploads"] == 0

    run(scenario)


def test_round_observers_hear_of_publish_and_of_the_deadline() -> None:
    async def scenario() -> None:
        async with running() as g:
            ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
            try:
                req = ctx.request(Message(code=Code.GET, uri=f"{g.uri}/round", observe=0))
                first = cbor2.loads((await req.response).payload)
                assert (first["round"], first["open"]) == (ROUND, True)
                assert req.observation is not None
                notes = req.observation.__aiter__()
                g.svc.publish_model(MODEL, ROUND + 1, deadline_s=0.3)
                opened = cbor2.loads((await asyncio.wait_for(anext(notes), 5)).payload)
                assert (opened["round"], opened["open"]) == (ROUND + 1, True)
                closed = cbor2.loads((await asyncio.wait_for(anext(notes), 5)).payload)
                assert (closed["round"], closed["open"]) == (ROUND + 1, False)
                req.observation.cancel()
            finally:
                await ctx.shutdown()

    run(scenario)


# --- interop with libcoap's command-line client ------------------------------------------

COAP_CLIENT = shutil.which("coap-client-notls")


@pytest.mark.skipif(COAP_CLIENT is None, reason="coap-client-notls (Debian libcoap3-bin) absent")
def test_libcoap_client_fetches_the_model_and_uploads_blockwise(tmp_path: Path) -> None:
    assert COAP_CLIENT is not None

    async def coap_client(*args: str) -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            COAP_CLIENT, "-B", "10", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        return proc.returncode or 0, out, err

    async def scenario() -> None:
        async with running() as g:
            payload, _ = g.svc.model_payload()
            out_file = tmp_path / "model.cbor"
            rc, _, err = await coap_client(
                "-m", "get", "-b", "64", "-o", str(out_file), f"{g.uri}/model"
            )
            assert rc == 0, err
            assert out_file.read_bytes() == payload
            np.testing.assert_array_equal(decode_model(out_file.read_bytes()).params, MODEL)

            upload = tmp_path / "update.cbor"
            upload.write_bytes(envelope(g.svc, "d07"))
            rc, out, err = await coap_client(
                "-m", "post", "-b", "64", "-f", str(upload), f"{g.uri}/update"
            )
            assert rc == 0, err
            assert b"accepted" in out, (out, err)
            assert g.svc.health()["accepted"] == 1
            assert g.coap.updates.blocks_received == -(-upload.stat().st_size // 64)

            bad = tmp_path / "bad.cbor"
            bad.write_bytes(envelope(g.svc, "d08", round=ROUND + 5))
            rc, out, err = await coap_client(
                "-m", "post", "-b", "64", "-f", str(bad), f"{g.uri}/update"
            )
            assert b"stale-round" in out + err, (out, err)
            assert g.svc.close_round().devices == ["d07"]

    run(scenario)
