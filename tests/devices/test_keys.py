"""Device keys: files with safe permissions, the registry, and ``tierfl keys new``."""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from devices.keys import (
    DeviceRegistry,
    KeyFileError,
    add_keys_parser,
    check_device_id,
    generate_keypair,
    load_private_key,
    load_public_key,
    public_key_hex,
    save_keypair,
)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_save_and_load_keypair(tmp_path: Path) -> None:
    key = generate_keypair()
    key_path, pub_path = save_keypair(key, tmp_path / "keys", "gw00-d003")
    assert (key_path.name, pub_path.name) == ("gw00-d003.key", "gw00-d003.pub")
    assert _mode(key_path) == 0o600 and _mode(tmp_path / "keys") == 0o700
    loaded = load_private_key(key_path)
    assert public_key_hex(loaded) == public_key_hex(key)
    assert public_key_hex(load_public_key(pub_path)) == public_key_hex(key)
    with pytest.raises(KeyFileError, match="already exists"):
        save_keypair(generate_keypair(), tmp_path / "keys", "gw00-d003")
    other = generate_keypair()
    save_keypair(other, tmp_path / "keys", "gw00-d003", overwrite=True)
    assert _mode(key_path) == 0o600
    assert public_key_hex(load_private_key(key_path)) == public_key_hex(other)


def test_private_key_with_open_permissions_is_refused(tmp_path: Path) -> None:
    key_path, _ = save_keypair(generate_keypair(), tmp_path, "d1")
    os.chmod(key_path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(key_path)
    load_private_key(key_path, check_permissions=False)


def test_raw_and_hex_key_files(tmp_path: Path) -> None:
    key = generate_keypair()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "a.pub").write_bytes(raw)
    (tmp_path / "b.pub").write_text(raw.hex() + "\n")
    assert public_key_hex(load_public_key(tmp_path / "a.pub")) == raw.hex()
    assert public_key_hex(load_public_key(tmp_path / "b.pub")) == raw.hex()
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(KeyFileError, match=r"bad\.pub"):
        load_public_key(tmp_path / "bad.pub")


def test_registry_from_directory_and_files(tmp_path: Path) -> None:
    keys = {d: generate_keypair() for d in ("d1", "d2")}
    for d, k in keys.items():
        save_keypair(k, tmp_path / "dir", d)
    reg = DeviceRegistry.load(tmp_path / "dir")
    assert sorted(reg) == ["d1", "d2"] and "d3" not in reg and reg.get("d3") is None
    expected = {d: public_key_hex(k) for d, k in sorted(keys.items())}
    assert reg.to_hex() == expected
    (tmp_path / "reg.json").write_text(json.dumps(expected))
    assert DeviceRegistry.load(tmp_path / "reg.json").to_hex() == expected
    toml = "[devices]\n" + "".join(f'"{d}" = "{h}"\n' for d, h in expected.items())
    (tmp_path / "reg.toml").write_text(toml)
    assert DeviceRegistry.load(tmp_path / "reg.toml").to_hex() == expected


def test_registry_remove_revokes_a_device() -> None:
    reg = DeviceRegistry({"d1": generate_keypair(), "d2": generate_keypair()})
    reg.remove("d1")
    assert sorted(reg) == ["d2"] and reg.get("d1") is None
    with pytest.raises(KeyError, match="'d1' is not registered"):
        reg.remove("d1")


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("r.json", '{"bad id": "00"}', "invalid device id"),
        ("r.json", '{"d1": "00"}', "d1"),
        ("r.json", '{"d1": 5}', "must be a string"),
        ("r.json", "[1, 2]", "mapping"),
        ("r.toml", "devices = [", "r.toml"),
        ("r.yaml", "d1: x", ".toml or .json"),
    ],
)
def test_bad_registry_files(tmp_path: Path, name: str, text: str, needle: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(KeyFileError, match=needle):
        DeviceRegistry.load(tmp_path / name)


def test_device_ids() -> None:
    assert check_device_id("gw00-d003") == "gw00-d003"
    for bad in ("", "-x", "a b", "a/b", "x" * 65, "é"):
        with pytest.raises(ValueError):
            check_device_id(bad)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierfl")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_keys_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["keys", "new", "--id", "d7", "--out", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    hex_key = public_key_hex(load_public_key(tmp_path / "d7.pub"))
    assert f'"d7" = "{hex_key}"' in out and _mode(tmp_path / "d7.key") == 0o600
    assert args.func(args) == 1
    assert "already exists" in capsys.readouterr().err
    args = _parser().parse_args(["keys", "new", "--id", "d7", "--out", str(tmp_path), "--force"])
    assert args.func(args) == 0
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["keys", "new", "--id", "bad id", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "invalid device id" in capsys.readouterr().err
