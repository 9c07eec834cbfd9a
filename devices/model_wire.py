"""The model download (gateway -> device) as it goes on the wire, for every transport.

One canonical CBOR map, the fields of a ``full`` :class:`devices.downlink.Downlink`
plus what a device needs to train and answer::

    "v"         uint   format version (1)
    "kind"      text   "full" (the whole model; deltas are a later optimisation)
    "hash"      text   SHA-256 hex of the float32 bytes (devices.downlink.model_hash):
                       the model's version, the base of the device's next update,
                       and the CoAP ETag
    "round"     uint   the round this model opens
    "shapes"    array  the model's tensor shapes (arrays of uint), in parameter order
    "encoding"  text   the update codec the gateway asks for (devices.codecs name)
    "size"      uint   number of float32 parameters
    "data"      bytes  little-endian float32 parameters, 4 * size bytes

The device rebuilds the parameters through :func:`devices.downlink.apply_downlink`,
which checks the length and verifies the hash, so a corrupted or truncated
download is refused instead of trained on. Lives in ``devices`` because both
tiers need it and ``devices`` must not import ``gateway``. Numpy + cbor2 only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import cbor2
import numpy as np

from devices.downlink import Downlink, DownlinkError, apply_downlink, model_hash

__all__ = ["MODEL_WIRE_VERSION", "ModelDownload", "decode_model", "encode_model"]

MODEL_WIRE_VERSION: Final = 1
_KEYS: Final = frozenset({"v", "kind", "hash", "round", "shapes", "encoding", "size", "data"})


@dataclass(frozen=True)
class ModelDownload:
    """A verified model as a device receives it."""

    hash: str
    round: int
    shapes: list[tuple[int, ...]]
    encoding: str
    params: np.ndarray  # float32, flat

    def tensors(self) -> list[np.ndarray]:
        """The flat parameters split into the model's tensors (views)."""
        out, pos = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(self.params[pos : pos + n].reshape(s))
            pos += n
        return out


def encode_model(
    params: np.ndarray, round_: int, shapes: Sequence[Sequence[int]], encoding: str = "f32"
) -> tuple[bytes, str]:
    """(wire bytes, version hash) of ``params`` (flattened to float32) for ``round_``."""
    flat = np.ascontiguousarray(params, dtype="<f4").reshape(-1)
    shp = [[int(d) for d in s] for s in shapes]
    if sum(math.prod(s) for s in shp) != flat.size:
        raise ValueError(f"shapes {shp} do not add up to {flat.size} parameters")
    version = model_hash(flat)
    doc = {
        "v": MODEL_WIRE_VERSION,
        "kind": "full",
        "hash": version,
        "round": int(round_),
        "shapes": shp,
        "encoding": encoding,
        "size": int(flat.size),
        "data": flat.tobytes(),
    }
    return cbor2.dumps(doc, canonical=True), version


def _bad(detail: str) -> DownlinkError:
    return DownlinkError("bad-payload", detail)


def decode_model(data: bytes, *, max_bytes: int = 64 << 20) -> ModelDownload:
    """Parse and verify a model download; raises :class:`DownlinkError` saying what is wrong."""
    if len(data) > max_bytes:
        raise _bad(f"model download of {len(data)} bytes exceeds {max_bytes}")
    try:
        doc: Any = cbor2.loads(data, max_depth=4, allow_indefinite=False)
    except Exception as e:  # the decoder's own failures on bad input
        raise _bad(f"model download is not valid CBOR: {e}") from None
    if not isinstance(doc, dict) or set(doc) != _KEYS:
        got = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise _bad(f"model download must be a map with {sorted(_KEYS)}, got {got}")
    if doc["v"] != MODEL_WIRE_VERSION or doc["kind"] != "full":
        raise _bad(f"unsupported model download v={doc['v']!r} kind={doc['kind']!r}")
    rnd, size, shapes = doc["round"], doc["size"], doc["shapes"]
    if type(rnd) is not int or rnd < 0 or type(size) is not int or size < 0:
        raise _bad("'round' and 'size' must be non-negative integers")
    if not isinstance(doc["encoding"], str) or not isinstance(doc["hash"], str):
        raise _bad("'encoding' and 'hash' must be text")
    if not isinstance(shapes, list) or not all(
        isinstance(s, list) and all(type(d) is int and d >= 0 for d in s) for s in shapes
    ):
        raise _bad("'shapes' must be an array of arrays of non-negative integers")
    shp = [tuple(s) for s in shapes]
    if sum(math.prod(s) for s in shp) != size:
        raise _bad(f"shapes {shp[:4]}... do not add up to size {size}")
    dl = Downlink("full", doc["hash"], None, size, doc["data"])
    params = apply_downlink(dl, None)  # length and hash checked here
    return ModelDownload(doc["hash"], rnd, shp, doc["encoding"], params)
