"""CoAP gateway intake: sustained block-wise uploads of 50 KB signed updates, vs bare aiocoap.

Three servers run in turn, each in its own subprocess (so ``time.process_time``
and RSS are the server's alone), fed by the same many concurrent clients over
loopback:

- **bare**: a stock aiocoap ``Site`` + ``Resource`` that only counts block-wise
  POSTs (aiocoap's own Block1 assembly, nothing else): the ceiling aiocoap
  itself allows, and the baseline of the headline ratio;
- **bare-tuned**: the same counting resource behind the gateway's two dispatch
  shortcuts (``gateway.coap._Site``: no deep copy of every request;
  ``_Context``: no eager ``repr`` of every request), to show what validation
  costs on top of the same stack;
- **gateway**: ``gateway.coap.CoapGateway`` with the full path -- bounded
  Block1 assembly, CBOR schema walk, Ed25519 signature check, replay cache,
  round/base/shape checks, f32 decode, NaN check, norm bound, rate limit,
  exactly-once intake into the partial aggregate.

All get the same EXCHANGE_LIFETIME bound (``--exchange-lifetime``, via
``gateway.coap.bound_exchange_lifetime``). Each client has its own UDP
socket (aiocoap's client allows one outstanding CON per server and context,
and uploads from one socket must not interleave) and is a small raw CoAP
sender (CON, Block1 with Size1 and Request-Tag, retransmission, separate
responses), so the client side costs little CPU on a shared 2-core box.

Printed: accepted uploads/s, p50/p99 upload latency (first block sent to final
answer, at the given concurrency), server CPU ms per upload, server RSS after
the run (and its peak), and whether every upload sent was accepted (zero
loss). Targets on one core: >= 50 accepted 50 KB uploads/s, >= 80 % of the
bare rate, nothing lost, RSS < 500 MB after 3,000 uploads.

``1-core/s`` is 1000 / (server CPU ms per upload): the rate one fully available
core would sustain, a figure that does not depend on what else runs on a
shared machine (the measured rate does).

    .venv/bin/python bench/bench_gateway_coap.py [--uploads 3000] [--clients 16] [--repeats 1]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from devices.codecs import encode  # noqa: E402
from devices.envelope import Envelope, seal  # noqa: E402

PARAMS = 12_500  # 50 KB of float32
ROUND = 1
SZX = 6  # 1024-byte blocks
ACK_TIMEOUT = 2.0
MAX_RETRANSMIT = 4


def device_key(seed: int, i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"{seed}/{i}".encode()).digest())


def device_id(i: int) -> str:
    return f"bench-d{i:05d}"


def initial_model(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, PARAMS).astype(np.float32)


def rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out.get("VmRSS", 0), out.get("VmHWM", 0)


# --- the server subprocess ------------------------------------------------------------


def serve(mode: str, devices: int, seed: int, exchange_lifetime: float) -> None:
    """Run one server; print its port; answer 'stats' lines on stdin with a JSON line."""
    import aiocoap
    from aiocoap import Code, Message, resource

    from devices.keys import DeviceRegistry
    from gateway.coap import CoapGateway, _Context, _Site, bound_exchange_lifetime
    from gateway.config import CoapListener, GatewayConfig, Limits
    from gateway.service import GatewayService

    counts = {"uploads": 0}
    service: GatewayService | None = None

    class CountingResource(resource.Resource):
        """The bare ceiling: aiocoap assembles the blocks; we only count."""

        async def render_post(self, request: Message) -> Message:
            counts["uploads"] += 1
            return Message(code=Code.CHANGED, payload=b"ok")

    async def main() -> None:
        nonlocal service
        loop = asyncio.get_running_loop()
        if mode in ("bare", "bare-tuned"):
            # bare: stock aiocoap Site and Context; bare-tuned: the gateway's two
            # dispatch shortcuts (no per-request deep copy, no eager repr)
            site = resource.Site() if mode == "bare" else _Site()
            site.add_resource(["update"], CountingResource())
            context_class = aiocoap.Context if mode == "bare" else _Context
            ctx = await context_class.create_server_context(
                site, bind=("127.0.0.1", 0), transports=["udp6"]
            )
            bound_exchange_lifetime(ctx, exchange_lifetime)
            sock = ctx.request_interfaces[0].token_interface.message_interface.transport
            port = sock.get_extra_info("socket").getsockname()[1]
        else:
            registry = DeviceRegistry(
                {device_id(i): device_key(seed, i).public_key() for i in range(devices)}
            )
            cfg = GatewayConfig(
                id="bench",
                coap=CoapListener(host="127.0.0.1", port=0, exchange_lifetime_s=exchange_lifetime),
                # one update per device; a wide skew window because envelopes are sealed
                # before the timed run starts
                limits=Limits(norm_bound=1e6, max_skew_s=3600.0),
            )
            service = GatewayService("bench", registry, [(PARAMS,)], cfg)
            service.publish_model(initial_model(seed), ROUND, deadline_s=3600.0)
            gw = CoapGateway(service)
            _, port = await gw.start()
        done = loop.create_future()

        def stdin_reader() -> None:
            for line in sys.stdin:
                if line.strip() == "stats":
                    loop.call_soon_threadsafe(report)
            loop.call_soon_threadsafe(finish)

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        def report() -> None:
            rss, hwm = rss_bytes()
            doc: dict[str, Any] = {"cpu_s": time.process_time(), "rss": rss, "hwm": hwm}
            if service is not None:
                h = service.health()
                doc.update(accepted=h["accepted"], rejected=h["rejected"], dup=h["duplicates"])
            else:
                doc.update(accepted=counts["uploads"], rejected=0, dup=0)
            print(json.dumps(doc), flush=True)

        threading.Thread(target=stdin_reader, daemon=True).start()
        print(json.dumps({"port": port}), flush=True)
        await done

    asyncio.run(main())


class Server:
    """Handle on a server subprocess."""

    def __init__(self, mode: str, devices: int, seed: int, exchange_lifetime: float) -> None:
        cmd = [
            sys.executable, __file__, "--serve", mode, "--devices", str(devices),
            "--seed", str(seed), "--exchange-lifetime", str(exchange_lifetime),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        self.port = int(self._line()["port"])

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited with {self.proc.wait()}")
        return json.loads(line)

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- a minimal raw CoAP block-wise client ---------------------------------------------


def _opt(delta: int, value: bytes) -> bytes:
    def nib(x: int) -> tuple[int, bytes]:
        if x < 13:
            return x, b""
        if x < 269:
            return 13, bytes([x - 13])
        return 14, struct.pack("!H", x - 269)

    dn, dx = nib(delta)
    ln, lx = nib(len(value))
    return bytes([(dn << 4) | ln]) + dx + lx + value


def _uint(x: int) -> bytes:
    return x.to_bytes((x.bit_length() + 7) // 8, "big")


def block_request(mid: int, token: bytes, num: int, more: bool, payload: bytes, total: int,
                  tag: bytes) -> bytes:  # fmt: skip
    """A CON POST /update carrying one Block1 block (Size1 on block 0, Request-Tag always)."""
    head = bytes([0x40 | len(token), 0x02]) + struct.pack("!H", mid) + token
    opts = _opt(11, b"update") + _opt(27 - 11, _uint((num << 4) | (int(more) << 3) | SZX))
    last = 27
    if num == 0:
        opts += _opt(60 - last, _uint(total))
        last = 60
    opts += _opt(292 - last, tag)
    return head + opts + b"\xff" + payload


@dataclass
class Result:
    latencies: list[float]
    codes: dict[str, int]
    lost: int
    retransmits: int


class RawClient(asyncio.DatagramProtocol):
    """One socket; uploads sequentially, one block in flight (like any CoAP client, NSTART 1)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: Result) -> None:
        self.loop = loop
        self.stats = stats
        self.transport: asyncio.DatagramTransport | None = None
        self.mid = random.randrange(1 << 16)
        self.tok = 0
        self.waiting: asyncio.Future[int] | None = None
        self.want_mid = -1
        self.want_token = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 4 or self.waiting is None or self.waiting.done():
            return
        mtype = (data[0] >> 4) & 3
        tkl = data[0] & 0x0F
        code = data[1]
        mid = struct.unpack("!H", data[2:4])[0]
        token = data[4 : 4 + tkl]
        if mtype == 2 and code == 0 and mid == self.want_mid:
            self.want_mid = -1  # empty ACK: a separate response follows, stop retransmitting
            return
        if token != self.want_token or code == 0:
            return
        if mtype == 0 and self.transport is not None:  # CON response: acknowledge it
            self.transport.sendto(bytes([0x60, 0]) + data[2:4])
        if mtype in (0, 1) or mid == self.want_mid:
            self.waiting.set_result(code)

    async def exchange(self, build: Any) -> int | None:
        """Send one request, retransmitting until an answer; its code, or None when lost."""
        self.mid = (self.mid + 1) & 0xFFFF
        self.tok += 1
        token = self.tok.to_bytes(4, "big")
        datagram = build(self.mid, token)
        self.waiting = self.loop.create_future()
        self.want_mid, self.want_token = self.mid, token
        timeout = ACK_TIMEOUT * random.uniform(1.0, 1.5)
        assert self.transport is not None
        for attempt in range(MAX_RETRANSMIT + 1):
            if attempt == 0 or self.want_mid != -1:
                if attempt:
                    self.stats.retransmits += 1
                self.transport.sendto(datagram)
            try:
                return await asyncio.wait_for(asyncio.shield(self.waiting), timeout)
            except TimeoutError:
                timeout *= 2
        return None

    async def upload(self, data: bytes) -> None:
        tag = os.urandom(4)
        size = 1 << (SZX + 4)
        nblocks = max(1, -(-len(data) // size))
        t0 = time.perf_counter()
        code: int | None = None
        for num in range(nblocks):
            more = num < nblocks - 1
            chunk = data[num * size : (num + 1) * size]
            code = await self.exchange(
                lambda mid, tok, num=num, more=more, chunk=chunk: block_request(
                    mid, tok, num, more, chunk, len(data), tag
                )
            )
            if code is None:
                self.stats.lost += 1
                return
            if more and code != 0x5F:  # 2.31 Continue
                break
        assert code is not None
        dotted = "{}.{:02d}".format(*divmod(code, 32))
        self.stats.codes[dotted] = self.stats.codes.get(dotted, 0) + 1
        self.stats.latencies.append(time.perf_counter() - t0)


async def drive(port: int, uploads: list[bytes], clients: int, max_seconds: float) -> Result:
    loop = asyncio.get_running_loop()
    stats = Result([], {}, 0, 0)
    queue = list(reversed(uploads))

    async def worker() -> None:
        transport, proto = await loop.create_datagram_endpoint(
            lambda: RawClient(loop, stats), remote_addr=("127.0.0.1", port), family=socket.AF_INET
        )
        try:
            while queue and time.perf_counter() < deadline:
                await proto.upload(queue.pop())
        finally:
            transport.close()

    deadline = time.perf_counter() + max_seconds
    await asyncio.gather(*(worker() for _ in range(clients)))
    return stats


# --- the benchmark --------------------------------------------------------------------


@dataclass
class Row:
    server: str
    uploads: int
    accepted: int
    lost: int
    codes: dict[str, int]
    retransmits: int
    wall_s: float
    rate: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_upload: float
    rss_mb: float
    peak_rss_mb: float
    settled_rss_mb: float


def make_uploads(n: int, seed: int, base: str) -> list[bytes]:
    rng = np.random.default_rng(seed + 1)
    out = []
    for i in range(n):
        delta = rng.normal(0, 1e-3, PARAMS).astype(np.float32)
        env = Envelope.new(device_id(i), ROUND, base, 32, [encode("f32", delta)])
        out.append(seal(env, device_key(seed, i)))
    return out


def run_one(mode: str, uploads: list[bytes], args: argparse.Namespace) -> Row:
    server = Server(mode, len(uploads), args.seed, args.exchange_lifetime)
    try:
        before = server.stats()
        t0 = time.perf_counter()
        res = asyncio.run(drive(server.port, uploads, args.clients, args.max_seconds))
        wall = time.perf_counter() - t0
        after = server.stats()
        settled = after
        if mode == "gateway":  # what is left once the remembered exchanges have expired
            time.sleep(args.exchange_lifetime + 2.0)
            settled = server.stats()
    finally:
        server.close()
    accepted = int(after["accepted"]) - int(before["accepted"])
    lat = np.array(res.latencies) * 1e3 if res.latencies else np.zeros(1)
    return Row(
        server=mode,
        uploads=len(uploads),
        accepted=accepted,
        lost=res.lost + (len(uploads) - len(res.latencies) - res.lost),
        codes=res.codes,
        retransmits=res.retransmits,
        wall_s=round(wall, 2),
        rate=round(accepted / wall, 1),
        p50_ms=round(float(np.percentile(lat, 50)), 1),
        p99_ms=round(float(np.percentile(lat, 99)), 1),
        cpu_ms_per_upload=round(1e3 * (after["cpu_s"] - before["cpu_s"]) / max(accepted, 1), 3),
        rss_mb=round(after["rss"] / 2**20, 1),
        peak_rss_mb=round(after["hwm"] / 2**20, 1),
        settled_rss_mb=round(settled["rss"] / 2**20, 1),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--uploads", type=int, default=3000, help="uploads per server (default 3000)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exchange-lifetime", type=float, default=10.0,
                   help="aiocoap EXCHANGE_LIFETIME of all servers, s (default 10)")  # fmt: skip
    p.add_argument("--max-seconds", type=float, default=240.0,
                   help="stop sending after this long per server (default 240)")  # fmt: skip
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="interleaved runs of the three servers, best rate of each (default 1)",
    )
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--serve", choices=["bare", "bare-tuned", "gateway"], help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.devices, args.seed, args.exchange_lifetime)
        return 0
    if args.uploads < 1 or args.clients < 1 or args.repeats < 1:
        p.error("--uploads, --clients and --repeats must be >= 1")

    from devices.downlink import model_hash

    t = time.perf_counter()
    uploads = make_uploads(args.uploads, args.seed, model_hash(initial_model(args.seed)))
    print(
        f"sealed {len(uploads)} envelopes of {len(uploads[0])} bytes "
        f"({-(-len(uploads[0]) // 1024)} blocks each) in {time.perf_counter() - t:.1f} s; "
        f"{args.clients} concurrent clients, loopback",
        flush=True,
    )
    head = (
        f"{'server':10} {'uploads':>7} {'accepted':>8} {'lost':>4} {'upl/s':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'CPU ms/upl':>10} {'1-core/s':>8} {'RSS MB':>7} {'peak MB':>7}  codes"
    )
    rows: list[Row] = []
    best: dict[str, Row] = {}
    for _ in range(args.repeats):  # interleaved: the cores of this machine may be shared
        for mode in ("bare", "bare-tuned", "gateway"):
            r = run_one(mode, uploads, args)
            rows.append(r)
            if mode not in best or r.rate > best[mode].rate:
                best[mode] = r
            if len(rows) == 1:
                print(head)
            print(
                f"{r.server:10} {r.uploads:7d} {r.accepted:8d} {r.lost:4d} {r.rate:7.1f} "
                f"{r.p50_ms:7.1f} {r.p99_ms:7.1f} {r.cpu_ms_per_upload:10.3f} "
                f"{1e3 / max(r.cpu_ms_per_upload, 1e-9):8.1f} {r.rss_mb:7.1f} "
                f"{r.peak_rss_mb:7.1f}  {r.codes} retx={r.retransmits}",
                flush=True,
            )
    bare, tuned, gw = best["bare"], best["bare-tuned"], best["gateway"]
    ratio = gw.rate / bare.rate if bare.rate else 0.0
    ratio_tuned = gw.rate / tuned.rate if tuned.rate else 0.0
    cpu_ratio = bare.cpu_ms_per_upload / gw.cpu_ms_per_upload if gw.cpu_ms_per_upload else 0.0
    zero_loss = all(r.accepted == r.uploads and r.lost == 0 for r in rows if r.server == "gateway")
    best_of = f" (best of {args.repeats})" if args.repeats > 1 else ""
    print(
        f"gateway / bare aiocoap{best_of}: {ratio:.2f} of the bare rate (target >= 0.80), "
        f"{ratio_tuned:.2f} of bare-tuned; by server CPU per upload {cpu_ratio:.2f}\n"
        f"gateway: {gw.rate:.1f} accepted 50 KB uploads/s measured (target >= 50), "
        f"{1e3 / gw.cpu_ms_per_upload:.0f}/s one core could sustain "
        f"({gw.cpu_ms_per_upload:.2f} ms CPU per upload vs bare {bare.cpu_ms_per_upload:.2f}); "
        f"p50 {gw.p50_ms:.0f} ms, p99 {gw.p99_ms:.0f} ms at {args.clients} concurrent clients\n"
        f"gateway RSS after {gw.uploads} uploads {gw.rss_mb:.0f} MB (target < 500), "
        f"{gw.settled_rss_mb:.0f} MB {args.exchange_lifetime + 2:g} s later; "
        f"accepted == sent in every run: {zero_loss}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": [asdict(r) for r in rows],
                    "ratio": ratio,
                    "ratio_tuned": ratio_tuned,
                    "cpu_ratio": cpu_ratio,
                    "zero_loss": zero_loss,
                },
                indent=1,
            )
        )
    return 0 if zero_loss else 1


if __name__ == "__main__":
    sys.exit(main())
