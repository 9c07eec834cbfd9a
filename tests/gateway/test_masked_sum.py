"""The gateway in device-shares mode: a blind ring sum, refusals, drops, per-party forwards."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from devices.masking import PartyPublicKeys, mask_update
from devices.reasons import Rejection
from gateway.masked_sum import MaskedSum

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pub() -> PartyPublicKeys:
    keys = [X25519PrivateKey.generate() for _ in range(3)]
    return PartyPublicKeys(tuple(k.public_key().public_bytes_raw() for k in keys))


def test_the_sum_is_the_ring_sum_and_forwards_carry_lists_and_boxes(pub):
    rng = np.random.default_rng(0)
    ms = MaskedSum("gw3", 5, 200, parties=3)
    ups = [
        mask_update(f"gw3-d{i:03d}", 5, rng.normal(size=200), pub, weight=float(i + 1))
        for i in (4, 0, 2)
    ]
    for u in ups:
        ms.add(u)
    expect = ups[0].masked + ups[1].masked + ups[2].masked
    np.testing.assert_array_equal(ms.masked_sum, expect)
    assert ms.devices == ("gw3-d000", "gw3-d002", "gw3-d004")
    assert ms.count == 3 and ms.total_weight == 5.0 + 1.0 + 3.0
    fw = ms.forwards()
    assert [f.party for f in fw] == [0, 1, 2]
    assert all(f.unit == "gw3" and f.devices == ms.devices and f.count == 3 for f in fw)
    np.testing.assert_array_equal(fw[0].masked_sum, expect)
    assert fw[0].sealed == () and fw[1].masked_sum is None and fw[2].masked_sum is None
    by_dev = {u.device: u for u in ups}
    assert fw[2].sealed == tuple(by_dev[d].sealed[2] for d in ms.devices)
    # Party 0 gets the vector; the others get 92 bytes + the id per device.
    assert fw[0].nbytes == 200 * 8 + 3 * 9 + 64
    assert fw[1].nbytes == 3 * 92 + 3 * 9 + 64


def test_drop_takes_a_device_out_of_the_sum_and_every_list(pub):
    rng = np.random.default_rng(1)
    ms = MaskedSum("gw", 1, 50, parties=3)
    ups = [mask_update(f"d{i}", 1, rng.normal(size=50), pub) for i in range(3)]
    for u in ups:
        ms.add(u)
    ms.drop("d1")
    np.testing.assert_array_equal(ms.masked_sum, ups[0].masked + ups[2].masked)
    assert ms.devices == ("d0", "d2") and all(f.devices == ("d0", "d2") for f in ms.forwards())
    with pytest.raises(KeyError, match="'d1' is not in"):
        ms.drop("d1")


def test_per_device_forwards_one_unit_per_device(pub):
    ms = MaskedSum("gw", 2, 10, parties=3)
    ups = [mask_update(f"d{i}", 2, np.ones(10) * i, pub, weight=2.0) for i in range(2)]
    for u in ups:
        ms.add(u)
    fw = ms.forwards(per_device=True)
    assert [(f.unit, f.party) for f in fw] == [(d, k) for d in ("d0", "d1") for k in range(3)]
    np.testing.assert_array_equal(fw[3].masked_sum, ups[1].masked)
    assert all(f.count == 1 and f.total_weight == 2.0 for f in fw)
    assert MaskedSum("gw", 2, 10, parties=3).forwards() == []


def test_bad_updates_are_rejected_with_a_reason_naming_the_device(pub):
    ms = MaskedSum("gw", 4, 20, parties=3)
    good = mask_update("d1", 4, np.zeros(20), pub)
    ms.add(good)
    cases = [
        (mask_update("d2", 5, np.zeros(20), pub), "stale-round", "round 5"),
        (good, "replay", "already sent"),
        (dataclasses.replace(good, device="d3", masked=good.masked[:19]), "bad-shape", "int64"),
        (
            dataclasses.replace(good, device="d3", masked=good.masked.astype(np.float64)),
            "bad-shape",
            "float64",
        ),
        (dataclasses.replace(good, device="d3", weight=float("nan")), "malformed", "weight"),
        (
            dataclasses.replace(good, device="d3", sealed={1: good.sealed[1]}),
            "malformed",
            r"parties \[1\], expected \[1, 2\]",
        ),
        (
            dataclasses.replace(good, device="d3", sealed={1: b"x" * 79, 2: good.sealed[2]}),
            "malformed",
            "party 1 is not 92 B",
        ),
    ]
    for update, reason, text in cases:
        with pytest.raises(Rejection, match=text) as err:
            ms.add(update)
        assert err.value.reason == reason
        assert repr(update.device) in err.value.detail
    assert ms.devices == ("d1",)  # nothing refused got in
    np.testing.assert_array_equal(ms.masked_sum, good.masked)


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'crypten', 'ray', 'scipy', 'cloud'}:
            raise ImportError(f'{name} is blocked: the gateway must not need it')
        return None
sys.meta_path.insert(0, Block())
import gateway.masked_sum, gateway.secret_sharing
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'ray', 'crypten'}))
"""


def test_masked_sum_imports_without_torch_crypten_or_ray():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok []"
