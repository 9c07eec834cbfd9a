"""MQTT gateway intake: sustained 50 KB signed updates from many publishers, vs a bare subscriber.

A real mosquitto on loopback; every process below is separate, so CPU time
and RSS are each one's own:

- **publishers** (``--procs`` processes x ``--conns`` MQTT connections each):
  every connection plays a slice of the devices, one update in flight at a
  time like a device (publish QoS 1 on ``tierfl/gw0/update/<device>``, wait
  for the verdict on ``tierfl/gw0/ack/<device>``, send the next). Envelopes
  (12,500 float32 = 50 KB, Ed25519-signed) are sealed *before* each timed
  round. The clients are paho clients driven by one ``selectors`` loop per
  process (no thread per connection), so the load generator stays cheap on
  a shared 2-core box.
- **bare**: the ceiling. A paho subscriber (same client settings as the
  gateway: MQTT 5, QoS 1, TCP_NODELAY) that only counts each update and
  answers it with a constant, pre-encoded ack -- the least a subscriber can
  do and still let closed-loop devices proceed.
- **gateway**: ``gateway.mqtt.MqttIntake`` + ``gateway.service.GatewayService``,
  the full path: envelope CBOR walk, registry, Ed25519 verification, replay
  cache, round/base/shape checks, f32 decode, NaN check, exactly-once intake
  into the partial aggregate, ack publish, PUBACK after the verdict.

Rounds: each device sends one update per round (FedAvg counts a device once
per round), so ``--updates`` are spread over ``updates / devices`` rounds;
between rounds (untimed) the gateway closes the round -- whose aggregate
count must equal the devices, i.e. nothing lost -- and publishes the next
model, and the publishers seal the next envelopes against its hash.

Printed per phase: updates, accepted, lost, accepted/s, p50/p99 latency
(publish -> ack, at that concurrency), subscriber CPU ms per update (its
process CPU time / updates), mosquitto CPU ms per update, and ``1-core/s`` =
1000 / subscriber CPU ms: the rate one fully available core would sustain,
which does not depend on what else runs on a shared machine (the measured
rate does). Then the gateway / bare ratio, the gateway's RSS after all
updates and whether accepted == sent. Targets on one core: >= 2,000
accepted updates/s, zero loss, RSS < 500 MB after 20,000 updates.

    .venv/bin/python bench/bench_gateway_mqtt.py [--updates 20000] [--devices 2000]
        [--procs 2] [--conns 32] [--bare-rounds 2] [--inline] [--profile PATH] [--json out.json]

``--inline`` runs the gateway with ``MqttIntake(worker=False)`` (validation in
paho's network thread); ``--profile PATH`` writes a cProfile of every gateway
thread (C calls that release the GIL -- socket I/O, Ed25519 -- include the
wait to get it back, so read CPU from the table, not from the profile).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402

from devices.transport_mqtt import (  # noqa: E402
    ack_topic,
    decode_ack,
    disable_nagle,
    encode_ack,
    update_topic,
)

GW = "gw0"
PARAMS = 12_500  # 50 KB of float32
ROUND_TIMEOUT_S = 300.0


def device_key(seed: int, i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"{seed}/{i}".encode()).digest())


def device_id(i: int) -> str:
    return f"bench-d{i:05d}"


def model(seed: int, round_: int) -> np.ndarray:
    return np.random.default_rng([seed, round_]).normal(0, 0.1, PARAMS).astype(np.float32)


def rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out.get("VmRSS", 0), out.get("VmHWM", 0)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of another process (e.g. mosquitto), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send_line(doc: dict[str, Any]) -> None:
    print(json.dumps(doc), flush=True)


# --- subscriber subprocesses: the gateway and the bare ceiling -------------------------


def serve_gateway(
    port: int, devices: int, seed: int, queue_size: int, inline: bool, profile_to: str | None
) -> None:
    """Gateway intake; commands on stdin: open R | close | stats | quit."""
    from devices.keys import DeviceRegistry
    from gateway.config import GatewayConfig, Limits, MqttListener
    from gateway.mqtt import MqttIntake
    from gateway.service import GatewayService

    profiles: list[Any] = []
    if profile_to:
        import cProfile

        def start_profiler(*_: Any) -> None:
            prof = cProfile.Profile()
            profiles.append(prof)
            prof.enable()

        threading.setprofile(start_profiler)  # every thread started from now on
    registry = DeviceRegistry(
        {device_id(i): device_key(seed, i).public_key() for i in range(devices)}
    )
    # one update per device and round; a wide skew window because envelopes are sealed
    # before the timed round starts; no rate limit (the bench is the only sender)
    cfg = GatewayConfig(id=GW, limits=Limits(rate_limit_updates=0, max_skew_s=3600.0))
    service = GatewayService(GW, registry, [(PARAMS,)], cfg)
    listener = MqttListener(enabled=True, broker=f"mqtt://127.0.0.1:{port}")
    intake = MqttIntake(service, listener, queue_size=queue_size, worker=not inline).start()
    send_line({"ready": True})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "open":
            base = intake.publish_model(GW, model(seed, int(cmd[1])), int(cmd[1]), 3600.0)
            send_line({"base": base})
        elif cmd[0] == "close":
            intake.wait_idle(30)
            agg = intake.close_round(GW)
            send_line({"count": agg.count, "weight": agg.total_weight})
        elif cmd[0] == "stats":
            rss, hwm = rss_bytes()
            h = intake.health()
            send_line(
                {
                    "cpu_s": time.process_time(),
                    "rss": rss,
                    "hwm": hwm,
                    "accepted": h["accepted"],
                    "duplicate": h["duplicate"],
                    "rejected": h["rejected"],
                    "received": h["received"],
                }
            )
        elif cmd[0] == "quit":
            break
    intake.stop()
    if profile_to:
        import pstats

        for prof in profiles:
            prof.disable()
        stats = pstats.Stats(*profiles) if profiles else None
        if stats is not None:
            stats.dump_stats(profile_to)


def serve_bare(port: int, queue_size: int) -> None:
    """The ceiling: count updates, answer each with a constant ack (no validation)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    counts = {"received": 0}
    ack = encode_ack("accepted", None, "bare")
    ready = threading.Event()
    prefix = update_topic(GW, "")

    def on_connect(c: mqtt.Client, *_: Any) -> None:
        c.subscribe(update_topic(GW, "+"), qos=1)

    def on_message(c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        counts["received"] += 1
        c.publish(ack_topic(GW, m.topic[len(prefix) :]), ack, qos=1)

    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=MQTTProtocolVersion.MQTTv5
    )
    c.on_socket_open = disable_nagle
    c.on_connect = on_connect
    c.on_subscribe = lambda *_: ready.set()
    c.on_message = on_message
    c.max_inflight_messages_set(100)
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = queue_size
    c.connect("127.0.0.1", port, properties=props)
    c.loop_start()
    ready.wait(10)
    send_line({"ready": True})
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "stats":
            rss, hwm = rss_bytes()
            n = counts["received"]
            send_line({"cpu_s": time.process_time(), "rss": rss, "hwm": hwm, "accepted": n,
                       "duplicate": 0, "rejected": 0, "received": n})  # fmt: skip
        elif cmd and cmd[0] in ("open", "close"):
            send_line({"base": "0" * 64, "count": -1, "weight": 0.0})
        elif cmd and cmd[0] == "quit":
            break
    c.disconnect()
    c.loop_stop()


# --- publisher subprocesses ------------------------------------------------------------


class _Conn:
    """One MQTT connection playing a slice of the devices, one update in flight."""

    def __init__(self, port: int, name: str, devices: list[int]) -> None:
        self.devices = devices
        self.todo: list[tuple[str, bytes]] = []
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.subscribed = False
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name)
        c.on_socket_open = disable_nagle
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.connect("127.0.0.1", port, keepalive=120)
        self.client = c
        self.subscribe_topics = [(ack_topic(GW, device_id(i)), 1) for i in devices]

    def _on_subscribe(self, *_: Any) -> None:
        self.subscribed = True

    def _on_message(self, c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        device = m.topic.rsplit("/", 1)[1]
        t0 = self.sent_at.pop(device, None)
        if t0 is None:
            return  # an ack we were not waiting for
        self.latencies.append(now - t0)
        status = decode_ack(bytes(m.payload)).status
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.send_next()

    def send_next(self) -> None:
        if self.todo:
            device, payload = self.todo.pop()
            self.sent_at[device] = time.perf_counter()
            self.client.publish(update_topic(GW, device), payload, qos=1)

    @property
    def busy(self) -> bool:
        return bool(self.todo or self.sent_at)


def _pump(conns: list[_Conn], until: Any, timeout: float) -> bool:
    """Drive every paho client from one selector until ``until()``; False on timeout."""
    sel = selectors.DefaultSelector()
    masks: dict[int, int] = {}
    for c in conns:
        sock = c.client.socket()
        assert sock is not None
        masks[id(c)] = selectors.EVENT_READ
        sel.register(sock, selectors.EVENT_READ, c)
    deadline = time.monotonic() + timeout
    last_misc = time.monotonic()
    try:
        while not until():
            now = time.monotonic()
            if now > deadline:
                return False
            for c in conns:
                want = selectors.EVENT_READ | (
                    selectors.EVENT_WRITE if c.client.want_write() else 0
                )
                if masks[id(c)] != want:
                    sel.modify(c.client.socket(), want, c)  # type: ignore[arg-type]
                    masks[id(c)] = want
            for key, events in sel.select(0.2):
                conn: _Conn = key.data
                if events & selectors.EVENT_READ:
                    conn.client.loop_read()
                if events & selectors.EVENT_WRITE:
                    conn.client.loop_write()
            if now - last_misc > 1.0:
                for c in conns:
                    c.client.loop_misc()
                last_misc = now
        return True
    finally:
        sel.close()


def publish(port: int, lo: int, hi: int, conns: int, seed: int, tag: str) -> None:
    """Publisher process for devices [lo, hi); commands: seal R BASE | go | quit."""
    from devices.codecs import encode
    from devices.envelope import Envelope, seal

    ids = list(range(lo, hi))
    keys = {i: device_key(seed, i) for i in ids}
    group = [
        _Conn(port, f"bench-pub-{tag}-{j}", ids[j::conns]) for j in range(min(conns, len(ids)))
    ]
    if not _pump(group, lambda: all(c.client.is_connected() for c in group), 30):
        raise SystemExit("publisher: no CONNACK from the broker")
    for c in group:
        c.client.subscribe(c.subscribe_topics)
    if not _pump(group, lambda: all(c.subscribed for c in group), 30):
        raise SystemExit("publisher: subscriptions not acknowledged")
    delta = np.random.default_rng([seed, lo]).normal(0, 1e-3, PARAMS).astype(np.float32)
    tensors = [encode("f32", delta)]
    send_line({"ready": True})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "seal":
            t0 = time.perf_counter()
            r, base = int(cmd[1]), cmd[2]
            for c in group:
                c.todo = [
                    (device_id(i), seal(Envelope.new(device_id(i), r, base, 32, tensors), keys[i]))
                    for i in reversed(c.devices)
                ]
                c.latencies, c.statuses = [], {}
            n = sum(len(c.todo) for c in group)
            size = len(group[0].todo[0][1]) if group and group[0].todo else 0
            send_line({"sealed": n, "bytes": size, "secs": time.perf_counter() - t0})
        elif cmd[0] == "go":
            sent = sum(len(c.todo) for c in group)
            cpu0 = time.process_time()
            t_first = time.time()
            for c in group:
                c.send_next()
            ok = _pump(group, lambda: not any(c.busy for c in group), ROUND_TIMEOUT_S)
            t_last = time.time()
            statuses: dict[str, int] = {}
            for c in group:
                for k, v in c.statuses.items():
                    statuses[k] = statuses.get(k, 0) + v
            lost = sum(len(c.sent_at) + len(c.todo) for c in group)
            for c in group:  # a timed-out round leaves nothing behind for the next one
                c.todo, c.sent_at = [], {}
            send_line(
                {
                    "ok": ok,
                    "sent": sent,
                    "lost": lost,
                    "statuses": statuses,
                    "latencies": [x for c in group for x in c.latencies],
                    "t_first": t_first,
                    "t_last": t_last,
                    "cpu_s": time.process_time() - cpu0,
                }
            )
        elif cmd[0] == "quit":
            break
    for c in group:
        c.client.disconnect()


# --- the driver ------------------------------------------------------------------------


class Child:
    """A subprocess of this script speaking JSON lines."""

    def __init__(self, *args: str) -> None:
        self.name = " ".join(args[-6:])
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench child ({self.name}) exited with {self.proc.wait()}")
        return json.loads(line)

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def ask(self, cmd: str) -> dict[str, Any]:
        self.send(cmd)
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@dataclass
class Row:
    phase: str
    rounds: int
    updates: int = 0
    accepted: int = 0
    lost: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_ms: float = 0.0  # subscriber (gateway / bare) process CPU per update
    broker_cpu_ms: float = 0.0
    publisher_cpu_ms: float = 0.0
    aggregate_counts: list[int] = field(default_factory=list)
    rss_mb: float = 0.0
    peak_rss_mb: float = 0.0


def run_phase(
    phase: str,
    server: Child,
    pubs: list[Child],
    rounds: range,
    devices: int,
    broker_pid: int,
) -> Row:
    row = Row(phase, len(rounds))
    latencies: list[float] = []
    cpu = broker_cpu = pub_cpu = 0.0
    for r in rounds:
        base = server.ask(f"open {r}")["base"]
        for p in pubs:
            p.send(f"seal {r} {base}")
        for p in pubs:
            p.read()
        before, b0 = server.ask("stats"), proc_cpu_s(broker_pid)
        for p in pubs:
            p.send("go")
        results = [p.read() for p in pubs]
        after, b1 = server.ask("stats"), proc_cpu_s(broker_pid)
        closed = server.ask("close")
        if phase == "gateway":
            row.aggregate_counts.append(int(closed["count"]))
        wall = max(x["t_last"] for x in results) - min(x["t_first"] for x in results)
        row.wall_s += wall
        row.updates += sum(x["sent"] for x in results)
        row.lost += sum(x["lost"] for x in results)
        for x in results:
            for k, v in x["statuses"].items():
                row.statuses[k] = row.statuses.get(k, 0) + v
            latencies.extend(x["latencies"])
            pub_cpu += x["cpu_s"]
        row.accepted += int(after["accepted"]) - int(before["accepted"])
        cpu += after["cpu_s"] - before["cpu_s"]
        broker_cpu += b1 - b0
        if not all(x["ok"] for x in results):
            print(f"  {phase} round {r}: timed out after {ROUND_TIMEOUT_S:g} s", flush=True)
            break
    stats = server.ask("stats")
    lat = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    n = max(row.updates, 1)
    row.rate = round(row.accepted / row.wall_s, 1) if row.wall_s else 0.0
    row.wall_s = round(row.wall_s, 2)
    row.p50_ms = round(float(np.percentile(lat, 50)), 1)
    row.p99_ms = round(float(np.percentile(lat, 99)), 1)
    row.cpu_ms = round(1e3 * cpu / n, 3)
    row.broker_cpu_ms = round(1e3 * broker_cpu / n, 3)
    row.publisher_cpu_ms = round(1e3 * pub_cpu / n, 3)
    row.rss_mb = round(stats["rss"] / 2**20, 1)
    row.peak_rss_mb = round(stats["hwm"] / 2**20, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--updates", type=int, default=20_000, help="gateway updates (default 20000)")
    p.add_argument("--devices", type=int, default=2000,
                   help="devices = updates per round (default 2000)")  # fmt: skip
    p.add_argument("--procs", type=int, default=2, help="publisher processes (default 2)")
    p.add_argument("--conns", type=int, default=32,
                   help="MQTT connections per publisher process (default 32)")  # fmt: skip
    p.add_argument("--bare-rounds", type=int, default=2, help="rounds of the bare ceiling")
    p.add_argument(
        "--queue", type=int, default=64, help="gateway queue = MQTT 5 Receive Maximum (default 64)"
    )
    p.add_argument(
        "--inline", action="store_true", help="answer in paho's thread (MqttIntake(worker=False))"
    )
    p.add_argument(
        "--profile", metavar="PATH", help="cProfile every gateway thread into PATH (pstats)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--serve", choices=["gateway", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--publish", nargs=3, type=int, metavar=("LO", "HI", "TAG"),
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve == "gateway":
        serve_gateway(args.port, args.devices, args.seed, args.queue, args.inline, args.profile)
        return 0
    if args.serve == "bare":
        serve_bare(args.port, args.queue)
        return 0
    if args.publish:
        lo, hi, tag = args.publish
        publish(args.port, lo, hi, args.conns, args.seed, str(tag))
        return 0
    if min(args.updates, args.devices, args.procs, args.conns, args.bare_rounds) < 1:
        p.error("--updates, --devices, --procs, --conns and --bare-rounds must be >= 1")
    if args.devices < args.procs * args.conns:
        p.error("--devices must be >= --procs x --conns (each connection plays >= 1 device)")
    rounds = -(-args.updates // args.devices)

    from gateway.broker import MosquittoBroker

    common = ["--devices", str(args.devices), "--seed", str(args.seed), "--queue", str(args.queue)]
    head = (
        f"{'phase':8} {'updates':>7} {'accepted':>8} {'lost':>4} {'upd/s':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'CPU ms/upd':>10} {'1-core/s':>8} {'broker ms':>9} {'RSS MB':>7}"
    )
    rows: list[Row] = []
    # deep enough broker queues that nothing is dropped at this concurrency
    with MosquittoBroker(max_queued_messages=10_000, max_inflight_messages=args.queue) as broker:
        port = ["--port", str(broker.port)]
        assert broker.pid is not None
        chunk = -(-args.devices // args.procs)
        spans = [(k * chunk, min(args.devices, (k + 1) * chunk)) for k in range(args.procs)]
        pubs = [
            Child(*common, *port, "--conns", str(args.conns), "--publish", str(lo), str(hi), str(k))
            for k, (lo, hi) in enumerate(spans)
        ]
        children: list[Child] = list(pubs)
        try:
            for c in pubs:
                c.read()
            print(
                f"{args.devices} devices on {args.procs} x {args.conns} MQTT connections "
                f"(one update in flight each), {rounds} gateway rounds, 50 KB f32 envelopes, "
                f"loopback mosquitto (pid {broker.pid})",
                flush=True,
            )
            for phase, nrounds in (("bare", args.bare_rounds), ("gateway", rounds)):
                extra = ["--inline"] if args.inline else []
                extra += ["--profile", str(args.profile)] if args.profile else []
                server = Child("--serve", phase, *common, *port, *extra)
                children.append(server)
                server.read()
                row = run_phase(phase, server, pubs, range(1, nrounds + 1), args.devices,
                                broker.pid)  # fmt: skip
                server.close()
                rows.append(row)
                if len(rows) == 1:
                    print(head)
                print(
                    f"{row.phase:8} {row.updates:7d} {row.accepted:8d} {row.lost:4d} "
                    f"{row.rate:7.0f} {row.p50_ms:7.1f} {row.p99_ms:7.1f} {row.cpu_ms:10.3f} "
                    f"{1e3 / max(row.cpu_ms, 1e-9):8.0f} {row.broker_cpu_ms:9.3f} "
                    f"{row.rss_mb:7.1f}  pub {row.publisher_cpu_ms:.3f} ms {row.statuses}",
                    flush=True,
                )
        finally:
            for c in children:
                c.close()
    bare, gw = rows
    ratio = gw.rate / bare.rate if bare.rate else 0.0
    cpu_ratio = bare.cpu_ms / gw.cpu_ms if gw.cpu_ms else 0.0
    zero_loss = (
        gw.accepted == gw.updates
        and gw.lost == 0
        and gw.statuses == {"accepted": gw.updates}
        and gw.aggregate_counts == [args.devices] * rounds
    )
    print(
        f"gateway / bare subscriber: {ratio:.2f} of the bare rate; by subscriber CPU per "
        f"update {cpu_ratio:.2f}\n"
        f"gateway: {gw.rate:.0f} accepted 50 KB updates/s measured (target >= 2000 on one core), "
        f"{1e3 / gw.cpu_ms:.0f}/s one core could sustain ({gw.cpu_ms:.3f} ms CPU per update vs "
        f"bare {bare.cpu_ms:.3f}; mosquitto {gw.broker_cpu_ms:.3f} ms); p50 {gw.p50_ms:.1f} ms, "
        f"p99 {gw.p99_ms:.1f} ms at {args.procs * args.conns} concurrent publishers\n"
        f"gateway RSS after {gw.updates} updates {gw.rss_mb:.0f} MB, peak {gw.peak_rss_mb:.0f} MB "
        f"(target < 500); accepted == sent and every round's aggregate complete: {zero_loss}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": [asdict(r) for r in rows], "ratio": ratio, "cpu_ratio": cpu_ratio,
                 "zero_loss": zero_loss},
                indent=1,
            )
        )  # fmt: skip
    return 0 if zero_loss else 1


if __name__ == "__main__":
    sys.exit(main())
