"""A two-node Ray cluster on one machine: a pinned gateway lands on its edge node.

`ray start --head` plays the cloud node; a second `ray start --address` plays an
edge server advertising the custom resource ``gateway:gw01``. The emulation joins
with --ray-address and must place gw01's host actor on that node, with no code change.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_emulate import ROOT, SMOKE

RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(RAY), "start", "--block", "--disable-usage-stats", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=os.environ.copy(),
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_NODES = (
    "import json, logging, sys, ray\n"
    "ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)\n"
    "print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))\n"
)


def _nodes_when(address: str, ready, head: subprocess.Popen, deadline: float) -> list:
    """Poll the cluster's live nodes (from a subprocess) until ``ready(nodes)``."""
    while True:
        proc = subprocess.run(
            [sys.executable, "-c", _NODES, address],
            capture_output=True,
            text=True,
            timeout=60,
            env=os.environ.copy(),
        )
        if proc.returncode == 0:
            nodes = json.loads(proc.stdout.strip().splitlines()[-1])
            if ready(nodes):
                return nodes
        if time.time() > deadline or head.poll() is not None:
            raise TimeoutError(
                f"cluster at {address} not ready (exit {proc.returncode}): "
                f"{proc.stdout[-500:]} {proc.stderr[-2000:]}"
            )
        time.sleep(1)


@pytest.fixture
def cluster(monkeypatch):
    if not RAY.exists():
        pytest.skip("ray CLI not installed next to this Python")
    # Ray >= 2.59 authenticates cluster RPCs with a shared token; every node and every
    # driver (this test and the emulation it launches) gets the same one via the environment.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    # conftest pins private clusters to loopback with this switch, but it also stops a node
    # from joining another: here every node is given 127.0.0.1 explicitly instead.
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = _start(
        [
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
            '--resources={"cloud": 1}',
        ]
    )
    procs = [head]
    try:
        # Cluster state is read from a fresh subprocess: Ray caches its auth mode per
        # process, so an in-process ray.init with a token would clash with the
        # token-less local clusters other tests start in this process.
        nodes = _nodes_when(address, lambda ns: bool(ns), head, time.time() + 60)
        procs.append(
            _start(
                [
                    f"--address={address}",
                    "--num-cpus=1",
                    "--node-ip-address=127.0.0.1",
                    '--resources={"gateway:gw01": 1}',
                ]
            )
        )
        nodes = _nodes_when(
            address,
            lambda ns: any("gateway:gw01" in n["Resources"] for n in ns),
            head,
            time.time() + 60,
        )
        edge = next(n["NodeID"] for n in nodes if "gateway:gw01" in n["Resources"])
        yield address, edge
    finally:
        for p in reversed(procs):
            _stop(p)


def test_gateway_is_placed_on_the_edge_node_that_advertises_it(cluster, tmp_path):
    address, edge_node = cluster
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hierarchy.cli",
            "emulate",
            str(SMOKE),
            "--dataset",
            "digits",
            "--rounds",
            "2",
            "--ray-address",
            address,
            "--out",
            str(out),
            "--quiet",
            "--no-plots",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    hosts = report["placement"]["gateway_hosts"]
    pinned = [h for h in hosts if h["gateways"] == ["gw01"]]
    assert len(pinned) == 1 and pinned[0]["node"] == edge_node
    assert all("gw01" not in h["gateways"] for h in hosts if h is not pinned[0])
    assert report["rounds"][-1]["participants"] > 0
    # SMPC is on by default; the parties run on the driver's (head, "cloud") node, where
    # rank 0 serves the gloo rendezvous at that node's address.
    assert report["privacy"]["mode"] == "gateway-trusted"
    parties = report["placement"]["smpc_parties"]
    assert len(parties) == 3 and len({p["node"] for p in parties}) == 1
    assert all(p["node"] != edge_node for p in parties)
