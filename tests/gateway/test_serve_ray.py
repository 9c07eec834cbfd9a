"""`tierfl gateway serve --ray-address`: the cloud drives a gateway through its Ray actor.

The case itself (serve_ray_case.py) connects this interpreter to a token-authenticated
Ray cluster; Ray caches its auth mode per process, so it runs in a fresh pytest process
rather than next to the token-less local clusters other tests start in this one.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cloud_drives_the_gateway_through_its_ray_actor():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            "addopts=",
            "-p",
            "no:cacheprovider",
            str(Path(__file__).with_name("serve_ray_case.py")),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout
