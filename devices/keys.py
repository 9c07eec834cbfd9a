"""Device signing keys (Ed25519): generation, files, and the gateway's registry.

A device's private key is its identity: the gateway accepts an update only if
it verifies with the public key registered for the device id in the envelope.
So private key files are created with mode 0600 from the first byte (never
written world-readable and chmod-ed afterwards) and refused when group or
others can read them, like ``ssh`` does. Public keys are not secret.

File formats: private keys are PKCS#8 PEM; public keys are SubjectPublicKeyInfo
PEM. Loading also accepts the raw 32-byte key or its 64-character hex form,
which is what a microcontroller client usually stores. A registry is a
directory of ``<device-id>.pub`` files, or one TOML/JSON file mapping device
ids to hex public keys (at top level or under a ``devices`` table)::

    [devices]
    "gw00-d003" = "3b6a27bc..."

``tierfl keys new --id ID --out DIR`` writes ``DIR/ID.key`` and ``DIR/ID.pub``
and prints the registry line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "DEVICE_ID_PATTERN",
    "DeviceRegistry",
    "KeyFileError",
    "add_keys_parser",
    "check_device_id",
    "cmd_keys_new",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "parse_public_key",
    "public_key_hex",
    "save_keypair",
    "save_private_key",
    "save_public_key",
]

#: Device ids end up in file names, log lines and protocol replies: a conservative alphabet.
DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_HEX_KEY = re.compile(rb"\s*([0-9a-fA-F]{64})\s*")
_KEY_BYTES = 32
_MAX_KEY_FILE = 4096  # a PEM Ed25519 key is ~120 bytes; refuse to read anything big


class KeyFileError(ValueError):
    """A key file or registry is missing, unreadable, malformed or too permissive."""


def check_device_id(device: str) -> str:
    """Return ``device`` if it is a valid id, else raise ``ValueError`` saying why."""
    if not isinstance(device, str) or _DEVICE_ID.fullmatch(device) is None:
        raise ValueError(
            f"invalid device id {device!r}: use 1-64 characters from A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit"
        )
    return device


def generate_keypair() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key (its public half is ``key.public_key()``)."""
    return Ed25519PrivateKey.generate()


def public_key_hex(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The raw 32-byte public key as lowercase hex (the registry-file form)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _write_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` so the file never exists with wider permissions than ``mode``."""
    if not overwrite:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise KeyFileError(
                f"{path}: already exists (pass overwrite/--force to replace it)"
            ) from None
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have narrowed it; make it exact
            f.write(data)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_private_key(key: Ed25519PrivateKey, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``key`` as unencrypted PKCS#8 PEM with mode 0600."""
    p = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(p, pem, 0o600, overwrite)
    return p


def save_public_key(
    key: Ed25519PublicKey | Ed25519PrivateKey, path: str | Path, *, overwrite: bool = False
) -> Path:
    """Write the public key as SubjectPublicKeyInfo PEM (mode 0644: it is not secret)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    p = Path(path)
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_file(p, pem, 0o644, overwrite)
    return p


def save_keypair(
    key: Ed25519PrivateKey, directory: str | Path, device: str, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``DIR/<device>.key`` (0600) and ``DIR/<device>.pub``; create DIR (0700) if needed."""
    check_device_id(device)
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, pub_path = d / f"{device}.key", d / f"{device}.pub"
    if not overwrite:  # refuse before writing either file, so no half-written pair
        for p in (key_path, pub_path):
            if p.exists():
                raise KeyFileError(f"{p}: already exists (pass overwrite/--force to replace it)")
    save_private_key(key, key_path, overwrite=overwrite)
    save_public_key(key, pub_path, overwrite=overwrite)
    return key_path, pub_path


def _read_small(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path}: larger than {_MAX_KEY_FILE} bytes, not a key file")
    return data


def load_private_key(path: str | Path, *, check_permissions: bool = True) -> Ed25519PrivateKey:
    """Load a PEM, raw 32-byte or hex private key; refuse files group/others can access."""
    p = Path(path)
    data = _read_small(p)
    if check_permissions and os.name == "posix":
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"{p}: permissions {mode:04o} are too open for a private key (run: chmod 600 {p})"
            )
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise KeyFileError(f"{p}: not a readable unencrypted PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{p}: PEM key is {type(key).__name__}, expected Ed25519")
        return key
    raw = _raw_key(data)
    if raw is None:
        raise KeyFileError(f"{p}: expected a PEM, raw 32-byte or 64-hex-digit Ed25519 private key")
    return Ed25519PrivateKey.from_private_bytes(raw)


def _raw_key(data: bytes) -> bytes | None:
    if len(data) == _KEY_BYTES:
        return data
    m = _HEX_KEY.fullmatch(data)
    return bytes.fromhex(m.group(1).decode()) if m else None


def parse_public_key(data: bytes | str, *, where: str = "<key>") -> Ed25519PublicKey:
    """A public key from PEM, raw 32 bytes or 64 hex digits; ``where`` names it in errors."""
    b = data.encode() if isinstance(data, str) else data
    if b.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(b)
        except (ValueError, TypeError) as e:
            raise KeyFileError(f"{where}: not a readable PEM public key ({e})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{where}: PEM key is {type(key).__name__}, expected Ed25519")
        return key
    raw = _raw_key(b)
    if raw is None:
        raise KeyFileError(
            f"{where}: expected a PEM, raw 32-byte or 64-hex-digit Ed25519 public key"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load a PEM, raw 32-byte or hex public key file."""
    p = Path(path)
    return parse_public_key(_read_small(p), where=str(p))


class DeviceRegistry(Mapping[str, Ed25519PublicKey]):
    """Device id -> public key: who may send updates to this gateway.

    A read-mostly mapping; ``add`` and ``remove`` exist for enrolment and
    revocation at run time, and for tests.
    """

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for device, key in (keys or {}).items():
            self.add(device, key)

    def add(self, device: str, key: Ed25519PublicKey | Ed25519PrivateKey) -> None:
        check_device_id(device)
        pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
        if not isinstance(pub, Ed25519PublicKey):
            raise TypeError(f"key for {device!r} is {type(key).__name__}, expected Ed25519")
        self._keys[device] = pub

    def remove(self, device: str) -> None:
        """Revoke ``device``: its updates are refused (``unknown-device``) from now on."""
        try:
            del self._keys[device]
        except KeyError:
            raise KeyError(f"device {device!r} is not registered") from None

    def __getitem__(self, device: str) -> Ed25519PublicKey:
        return self._keys[device]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def to_hex(self) -> dict[str, str]:
        """``{device: hex public key}``, the registry-file form (sorted by id)."""
        return {d: public_key_hex(self._keys[d]) for d in sorted(self._keys)}

    @classmethod
    def from_directory(cls, directory: str | Path) -> DeviceRegistry:
        """Every ``<device-id>.pub`` in ``directory`` (private ``.key`` files are ignored)."""
        d = Path(directory)
        if not d.is_dir():
            raise KeyFileError(f"{d}: not a directory")
        reg = cls()
        for p in sorted(d.glob("*.pub")):
            try:
                check_device_id(p.stem)
            except ValueError as e:
                raise KeyFileError(f"{p}: {e}") from None
            reg.add(p.stem, load_public_key(p))
        return reg

    @classmethod
    def from_file(cls, path: str | Path) -> DeviceRegistry:
        """A ``.toml`` or ``.json`` file mapping device ids to hex (or PEM) public keys."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"{p}: cannot read: {e}") from None
        doc: Any
        try:
            if p.suffix.lower() == ".toml":
                doc = tomllib.loads(text)
            elif p.suffix.lower() == ".json":
                doc = json.loads(text)
            else:
                raise KeyFileError(f"{p}: registry files must end in .toml or .json")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise KeyFileError(f"{p}: {e}") from None
        if isinstance(doc, dict) and isinstance(doc.get("devices"), dict):
            doc = doc["devices"]
        if not isinstance(doc, dict):
            raise KeyFileError(f"{p}: expected a mapping of device id -> public key")
        reg = cls()
        for device, value in doc.items():
            if not isinstance(value, str):
                raise KeyFileError(
                    f"{p}: key of {device!r} must be a string, got {type(value).__name__}"
                )
            try:
                check_device_id(device)
            except ValueError as e:
                raise KeyFileError(f"{p}: {e}") from None
            reg.add(device, parse_public_key(value, where=f"{p}: {device}"))
        return reg

    @classmethod
    def load(cls, path: str | Path) -> DeviceRegistry:
        """A directory of ``.pub`` files or a TOML/JSON registry file."""
        p = Path(path)
        return cls.from_directory(p) if p.is_dir() else cls.from_file(p)


# --- CLI: tierfl keys new -------------------------------------------------------------


def _device_id_arg(text: str) -> str:
    try:
        return check_device_id(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_keys_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``keys`` with ``new`` to an argparse subparsers object (handlers set ``func``)."""
    keys = subparsers.add_parser(
        "keys",
        help="device signing keys (Ed25519)",
        description="Create device signing keys for signed updates.",
    )
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="{new}")
    new = sub.add_parser(
        "new",
        help="create a device keypair",
        description=(
            "Write OUT/ID.key (private, PKCS#8 PEM, mode 0600) and OUT/ID.pub (public PEM), "
            "and print the line to add to a gateway's registry file."
        ),
    )
    new.add_argument(
        "--id",
        dest="device_id",
        required=True,
        type=_device_id_arg,
        metavar="ID",
        help="device id (1-64 characters: A-Z a-z 0-9 . _ : -)",
    )
    new.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory for the key files (created with mode 0700 if missing)",
    )
    new.add_argument("--force", action="store_true", help="replace existing key files")
    new.set_defaults(func=cmd_keys_new)
    return keys


def cmd_keys_new(args: argparse.Namespace) -> int:
    """Handler of ``tierfl keys new``: 0 on success, 1 if the files exist or cannot be written."""
    key = generate_keypair()
    try:
        key_path, pub_path = save_keypair(key, args.out, args.device_id, overwrite=args.force)
    except (KeyFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {key_path} (private, mode 0600) and {pub_path}")
    print(f'registry entry: "{args.device_id}" = "{public_key_hex(key)}"')
    return 0
