"""Rejection reason codes shared by the device envelope and the gateway's validation.

They live here, in a module with no imports beyond the standard library, so
``devices.envelope`` can raise them without importing ``gateway`` (the tiers
import downward only) and ``gateway.validation`` re-exports the very same
objects. The codes are a protocol: they go back to devices in CoAP/MQTT
replies and label the gateway's rejection metrics, so they are short, stable
and never reworded.
"""

from __future__ import annotations

from typing import Final

__all__ = ["REASONS", "Rejection"]

REASONS: Final = (
    "too-large",  # the payload is over the size limit (checked before decoding)
    "malformed",  # not valid CBOR, wrong schema, wrong types, out-of-range values
    "bad-signature",  # the Ed25519 signature does not verify with the device's key
    "unknown-device",  # no registered key for this device id
    "replay",  # nonce already used, or timestamp outside the allowed clock skew
    "stale-round",  # the update is for another round than the gateway's current one
    "stale-base",  # the update was computed from another model version
    "bad-shape",  # tensor shapes/codecs do not match the model the gateway serves
    "non-finite",  # the decoded update contains NaN or infinity
    "norm-bound",  # the update's L2 norm is above the configured bound
    "rate-limited",  # the device sent too many updates, or intake capacity is exhausted
    "round-closed",  # the round's deadline/quorum has passed
    "incomplete",  # a transfer (e.g. CoAP blockwise) never completed
)


class Rejection(Exception):
    """An update refused for ``reason`` (one of :data:`REASONS`); ``detail`` says what and where.

    Servers turn it into the protocol's error reply and keep serving; the
    reason is checked at construction so a typo can never invent a new
    metrics label.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r} (known: {', '.join(REASONS)})")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[Rejection], tuple[str, str]]:
        # Exceptions pickle their args by default; ours has two positional fields.
        return (Rejection, (self.reason, self.detail))
