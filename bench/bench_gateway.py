"""Gateway intake over both transports: MQTT then CoAP, each against its bare ceiling.

The issue's ``bench/bench_gateway.py``: one command for the two intake
benchmarks, which live in their own files because each starts its own servers
and load generators as separate processes:

- ``bench_gateway_mqtt.py``: a real mosquitto, publishers with QoS 1, the full
  gateway path (CBOR walk, Ed25519, replay cache, exactly-once intake) vs a
  bare counting subscriber; accepted/s, p50/p99, CPU ms per update, lost;
- ``bench_gateway_coap.py``: block-wise 50 KB uploads from concurrent aiocoap
  clients to the gateway's Site vs a bare aiocoap resource; the same figures
  and the servers' RSS after the run.

    .venv/bin/python bench/bench_gateway.py
    .venv/bin/python bench/bench_gateway.py --mqtt "--updates 5000" --coap "--uploads 500"

Targets (one core): MQTT >= 2,000 accepted updates/s; CoAP >= 50 accepted
50 KB uploads/s and >= 80 % of the bare aiocoap rate; zero loss; RSS < 500 MB.
Exit code: non-zero if either benchmark failed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mqtt", default="", help="extra arguments for bench_gateway_mqtt.py")
    ap.add_argument("--coap", default="", help="extra arguments for bench_gateway_coap.py")
    ap.add_argument("--only", choices=("mqtt", "coap"), default=None)
    args = ap.parse_args(argv)
    rc = 0
    for name, extra in (("mqtt", args.mqtt), ("coap", args.coap)):
        if args.only and name != args.only:
            continue
        cmd = [sys.executable, str(HERE / f"bench_gateway_{name}.py"), *shlex.split(extra)]
        print(f"\n=== {name.upper()}: {' '.join(cmd[1:])}", flush=True)
        rc |= subprocess.run(cmd, check=False).returncode
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
