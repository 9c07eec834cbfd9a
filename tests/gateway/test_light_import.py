"""The gateway runs on edge servers: it must import with torch, CrypTen and Ray absent."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'crypten', 'ray', 'networkx', 'matplotlib'}:
            raise ImportError(f'{name} is blocked: the gateway must not need it')
        return None
sys.meta_path.insert(0, Block())
import gateway, gateway.partial_aggregate, devices
import numpy as np
p = gateway.partial_aggregate.PartialAggregate.empty('gw', 1, 3)
p.add('d', np.ones(3), 2.0)
assert p.total_weight == 2.0
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'ray', 'crypten'}))
"""


def test_gateway_imports_without_torch_crypten_or_ray():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok []"


def test_the_blocker_really_blocks():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER.replace("import gateway,", "import torch, gateway,")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


CLI_BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'crypten', 'ray', 'networkx', 'matplotlib'}:
            raise ImportError(f'{name} is blocked', name=name)
        return None
sys.meta_path.insert(0, Block())
from hierarchy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_tierfl_cli_serves_gateway_commands_on_a_gateway_only_install():
    ok = subprocess.run(
        [sys.executable, "-c", CLI_BLOCKED, "gateway", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "--config" in ok.stdout
    emu = subprocess.run(
        [sys.executable, "-c", CLI_BLOCKED, "emulate", "x.graphml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert emu.returncode == 2
    assert "needs the emulation extra" in emu.stderr
