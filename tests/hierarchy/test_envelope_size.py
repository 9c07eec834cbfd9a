"""The emulator's cached envelope size equals a real signed envelope's size."""

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.codecs import encode
from devices.envelope import PROTOCOL_VERSION, Envelope, seal
from hierarchy.actors import VIRTUAL_EPOCH, envelope_bytes


def test_cached_size_matches_sealed_envelopes():
    rng = np.random.default_rng(0)
    key = Ed25519PrivateKey.generate()
    for i in range(200):
        codec = ["f32", "int8", "topk-int8", "f16"][i % 4]
        x = rng.normal(size=int(rng.integers(1, 3000)))
        kw = {"k": max(1, x.size // 10)} if codec.startswith("topk") else {}
        enc = encode(codec, x, **kw)
        dev = "d" * int(rng.integers(1, 30))
        rnd, smp = int(rng.integers(0, 70000)), int(rng.integers(0, 70000))
        ts = float(rng.choice([0.0, 0.5, rng.random() * 10]))
        env = Envelope(
            PROTOCOL_VERSION, dev, rnd, "ab" * 32, bytes(16), VIRTUAL_EPOCH + ts, max(1, smp), [enc]
        )
        assert envelope_bytes(dev, rnd, "ab" * 32, smp, enc, ts) == len(seal(env, key))
