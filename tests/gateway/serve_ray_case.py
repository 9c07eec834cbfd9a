"""`tierfl gateway serve --ray-address`: the cloud drives a real gateway process through Ray.

A one-node Ray cluster (`ray start --head`, token auth as Ray >= 2.59 wants), a
gateway process that joins it and registers ``gateway:gw-ray``, and this test as
the cloud: it publishes a model through the actor, a device uploads over CoAP,
and ``close_round`` brings the PartialAggregate back across processes. When the
gateway stops (SIGTERM, exit 0), its actor goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from devices.codecs import encode
from devices.envelope import Envelope, seal
from devices.keys import generate_keypair, save_keypair
from devices.transport_coap import CoapDeviceClient
from gateway.broker import free_port
from gateway.rounds import ModelSource, save_model
from tests.gateway.test_serve import TIERFL, Lines, free_udp_port

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
GW = "gw-ray"


@pytest.fixture
def ray_head(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if not RAY.exists():
        pytest.skip("ray CLI not installed next to this Python")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    port = free_port()
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--block",
            "--disable-usage-stats",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=os.environ.copy(),
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        # SIGTERM to `ray start --block` alone: it stops its own daemons in ~2 s (a SIGTERM
        # to the whole group kills them under it and leaves it hanging). Then make sure.
        if head.poll() is None:
            os.kill(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=20)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)


def test_cloud_publishes_and_collects_through_the_gateway_actor(
    ray_head: str, tmp_path: Path
) -> None:
    import ray

    from gateway.ray_relay import RAY_NAMESPACE, gateway_actor

    key = generate_keypair()
    save_keypair(key, tmp_path / "keys", "d0")
    shapes = [(4, 3), (3,)]
    save_model(tmp_path / "m.npz", ModelSource(np.zeros(15, np.float32), shapes, "test"))
    coap_port = free_udp_port()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'id = "{GW}"\nregistry = "{tmp_path / "keys"}"\n'
        f'[coap]\nhost = "127.0.0.1"\nport = {coap_port}\n'
        f'[rounds]\nmodel = "{tmp_path / "m.npz"}"\n'  # no `out`: the cloud drives rounds
    )
    gw = subprocess.Popen(
        [*TIERFL, "gateway", "serve", "--config", str(cfg), "--ray-address", ray_head],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=os.environ.copy(),
    )
    try:
        ready = Lines(gw).wait_for("ready", timeout=90)
        assert f"Ray actor 'gateway:{GW}'" in ready
        ray.init(
            address=ray_head,
            namespace=RAY_NAMESPACE,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
        actor = gateway_actor(GW)
        params = np.linspace(-1, 1, 15).astype(np.float32)
        version = ray.get(actor.publish_model.remote(params, 5, 30.0, "f32"), timeout=30)
        assert len(version) == 64

        async def device() -> str:
            async with CoapDeviceClient(f"coap://127.0.0.1:{coap_port}", timeout_s=10) as c:
                info = await c.get_round()
                assert (info["round"], info["base"], info["open"]) == (5, version, True)
                delta = np.full(15, 0.5, np.float32)
                env = Envelope.new("d0", 5, version, 7, [encode("f32", delta)])
                reply = await c.post_update(seal(env, key))
                return reply.code

        assert asyncio.run(device()) == "2.04"
        agg = ray.get(actor.close_round.remote(), timeout=30)
        assert (agg.gateway, agg.round, agg.count, agg.total_weight) == (GW, 5, 1, 7.0)
        np.testing.assert_allclose(agg.weighted_sum, np.full(15, 3.5))
        assert ray.get(actor.round_info.remote(), timeout=30)["open"] is False
        with pytest.raises(Exception, match="must be > 0"):  # the gateway's error, relayed
            ray.get(actor.publish_model.remote(params, 6, -1.0), timeout=30)

        gw.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) == 0
        deadline = time.monotonic() + 30
        while True:  # the actor belonged to the gateway's job: it is gone (or going)
            try:
                ray.get(actor.ping.remote(), timeout=5)
            except Exception:
                break
            assert time.monotonic() < deadline, "the relay actor outlived its gateway"
            time.sleep(0.5)
    finally:
        if gw.poll() is None:
            gw.kill()
            gw.wait()
