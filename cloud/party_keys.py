"""Cloud aggregator parties' X25519 keypairs for the ``device-shares`` mode.

Each party k holds one private key; devices seal their per-party mask seeds
to the public keys (``devices.masking.seal_seed``). The public keys are not
secret: they are published with the model (``PartyPublicKeys.to_json``, with
a fingerprint a device can compare against the model announcement).

Files: ``DIR/party-<k>.key`` holds party k's raw private key as 64 hex digits,
created with mode 0600 from the first byte (never written wider and chmod-ed
afterwards) and refused on load when group or others can read it, like
``devices.keys`` does for device keys; ``DIR/parties.json`` holds the public
bundle. In a deployment each party's key file lives only on that party's
server; the emulation generates all K in one place.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from devices.masking import PartyPublicKeys

__all__ = [
    "PUBLIC_FILE",
    "generate_party_keys",
    "key_path",
    "load_party_key",
    "load_public_keys",
    "private_key_bytes",
    "private_key_from_bytes",
    "public_keys",
    "write_party_keys",
]

PUBLIC_FILE = "parties.json"


def generate_party_keys(parties: int) -> list[X25519PrivateKey]:
    """K fresh X25519 private keys, index = party rank."""
    if parties < 2:
        raise ValueError(f"need at least 2 parties, got {parties}")
    return [X25519PrivateKey.generate() for _ in range(parties)]


def public_keys(keys: Sequence[X25519PrivateKey]) -> PartyPublicKeys:
    """The public bundle devices seal to."""
    return PartyPublicKeys(tuple(k.public_key().public_bytes_raw() for k in keys))


def private_key_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != 32:
        raise ValueError(f"an X25519 private key is 32 bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def key_path(directory: str | Path, party: int) -> Path:
    return Path(directory) / f"party-{party}.key"


def _write_private(path: Path, data: bytes, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace)") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def write_party_keys(
    directory: str | Path, parties: int, *, overwrite: bool = False
) -> PartyPublicKeys:
    """Generate K keypairs into DIR (created 0700): ``party-<k>.key`` and ``parties.json``."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = generate_party_keys(parties)
    if not overwrite:
        for p in [key_path(d, k) for k in range(parties)] + [d / PUBLIC_FILE]:
            if p.exists():
                raise FileExistsError(f"{p}: already exists (pass overwrite=True to replace)")
    for k, key in enumerate(keys):
        _write_private(key_path(d, k), private_key_bytes(key).hex().encode() + b"\n", overwrite)
    pub = public_keys(keys)
    (d / PUBLIC_FILE).write_text(pub.to_json() + "\n", encoding="utf-8")
    return pub


def load_party_key(path: str | Path, *, check_permissions: bool = True) -> X25519PrivateKey:
    """Load a party's private key file (64 hex digits); refuse group/other-readable files."""
    p = Path(path)
    if check_permissions and os.name == "posix":
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(
                f"{p}: permissions {mode:04o} are too open for a private key (run: chmod 600 {p})"
            )
    text = p.read_bytes()[:200].strip()
    try:
        raw = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{p}: expected 64 hex digits (an X25519 private key)") from None
    try:
        return private_key_from_bytes(raw)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None


def load_public_keys(path: str | Path) -> PartyPublicKeys:
    """``parties.json`` (or a directory holding it) -> the public bundle."""
    p = Path(path)
    if p.is_dir():
        p = p / PUBLIC_FILE
    try:
        return PartyPublicKeys.from_json(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None
