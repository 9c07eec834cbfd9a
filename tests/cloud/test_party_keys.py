"""Cloud parties' X25519 keys: files with safe permissions, the public bundle devices seal to."""

import os

import pytest

from cloud.party_keys import (
    generate_party_keys,
    key_path,
    load_party_key,
    load_public_keys,
    public_keys,
    write_party_keys,
)
from devices.masking import open_seed, seal_seed


def test_written_keys_load_back_and_open_what_devices_seal(tmp_path):
    pub = write_party_keys(tmp_path / "k", 3)
    assert load_public_keys(tmp_path / "k") == pub and pub.parties == 3
    for r in range(3):
        p = key_path(tmp_path / "k", r)
        assert os.stat(p).st_mode & 0o777 == 0o600
        key = load_party_key(p)
        box = seal_seed(b"s" * 32, pub.key(r), "dev", 4, r)
        assert open_seed(box, key, "dev", 4, r) == b"s" * 32
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o700


def test_refusals(tmp_path):
    write_party_keys(tmp_path, 2)
    with pytest.raises(FileExistsError, match="already exists"):
        write_party_keys(tmp_path, 2)
    write_party_keys(tmp_path, 2, overwrite=True)
    p = key_path(tmp_path, 0)
    os.chmod(p, 0o644)
    with pytest.raises(PermissionError, match="too open"):
        load_party_key(p)
    p.write_text("not hex")
    os.chmod(p, 0o600)
    with pytest.raises(ValueError, match="64 hex digits"):
        load_party_key(p)
    (tmp_path / "parties.json").write_text('{"parties": ["00"]}')
    with pytest.raises(ValueError, match=r"parties\.json"):
        load_public_keys(tmp_path)
    with pytest.raises(ValueError, match="at least 2 parties"):
        generate_party_keys(1)


def test_public_bundle_matches_the_private_keys():
    keys = generate_party_keys(4)
    pub = public_keys(keys)
    assert [pub.key(i).public_bytes_raw() for i in range(4)] == [
        k.public_key().public_bytes_raw() for k in keys
    ]
    assert len(pub.fingerprint) == 64
