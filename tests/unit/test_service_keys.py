"""API keys: stored hashed, compared in constant time, revocable, listed without the key."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.service import keys as keys_module
from smartvm.service.keys import DB_FILE, KeyStore


def _all_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in data_dir.iterdir() if p.name.startswith(DB_FILE))


def test_a_key_is_stored_only_as_its_sha256(tmp_path: Path) -> None:
    with KeyStore(tmp_path) as store:
        key, rec = store.create("ci")
        assert key.startswith("svm_") and len(key) == 4 + 8 + 43
        assert rec.prefix == key[:12] and rec.name == "ci"
    raw = _all_bytes(tmp_path)
    assert key.encode() not in raw
    assert key[12:].encode() not in raw  # not even the secret part
    assert hashlib.sha256(key.encode()).hexdigest().encode() in raw


def test_keys_are_random_and_distinct(tmp_path: Path) -> None:
    with KeyStore(tmp_path) as store:
        made = {store.create()[0] for _ in range(20)}
    assert len(made) == 20
    assert len({k[:12] for k in made}) == 20


def test_verify_accepts_the_key_and_nothing_close_to_it(tmp_path: Path) -> None:
    with KeyStore(tmp_path) as store:
        key, _ = store.create("a")
        assert store.verify(key) is not None
        last = key[-1]
        assert store.verify(key[:-1] + ("A" if last != "A" else "B")) is None  # right prefix, wrong secret
        assert store.verify("svm_" + "x" * 51) is None  # well-formed, unknown prefix
        for bad in (None, "", key[:-1], key + "x", key.upper(), " " + key, "Bearer " + key):
            assert store.verify(bad) is None


def test_every_well_formed_key_goes_through_compare_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def recording(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", recording)
    with KeyStore(tmp_path) as store:
        key, _ = store.create()
        wrong_secret = key[:12] + ("A" * 43 if key[12:] != "A" * 43 else "B" * 43)
        unknown_prefix = "svm_" + "Z" * 8 + key[12:]
        for candidate in (key, wrong_secret, unknown_prefix):
            before = len(calls)
            store.verify(candidate)
            assert len(calls) == before + 1, candidate
    # the unknown prefix is compared against a dummy hash, the others against the stored one
    stored = hashlib.sha256(key.encode()).hexdigest()
    assert [a for a, _ in calls] == [stored, stored, keys_module._DUMMY_HASH]


def test_revoked_keys_are_refused_and_listed_as_revoked(tmp_path: Path) -> None:
    with KeyStore(tmp_path) as store:
        key, rec = store.create("gone")
        other, _ = store.create("stays")
        revoked = store.revoke("gone")
        assert revoked.prefix == rec.prefix and not revoked.active
        assert store.verify(key) is None
        assert store.verify(other) is not None
        assert [k.name for k in store.list()] == ["stays"]
        assert {k.name: k.active for k in store.list(include_revoked=True)} == {"gone": False, "stays": True}
        with pytest.raises(SmartVMError) as err:
            store.revoke("gone")
        assert err.value.code is ErrorCode.API_KEY_NOT_FOUND
        store.revoke(store.list()[0].prefix)  # by prefix works too
        assert store.verify(other) is None
        store.create("gone")  # a revoked key's name may be used again


def test_revocation_in_another_process_takes_effect_at_once(tmp_path: Path) -> None:
    with KeyStore(tmp_path) as service_side:
        key, _ = service_side.create("k")
        assert service_side.verify(key) is not None
        with KeyStore(tmp_path) as cli_side:
            cli_side.revoke("k")
        assert service_side.verify(key) is None


def test_active_names_are_unique_and_checked(tmp_path: Path) -> None:
    with KeyStore(tmp_path) as store:
        store.create("dup")
        with pytest.raises(SmartVMError) as err:
            store.create("dup")
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(SmartVMError, match="key name") as err:
            store.create("has space")
        assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_last_use_is_recorded_but_not_on_every_request(tmp_path: Path) -> None:
    with KeyStore(tmp_path) as store:
        key, _ = store.create("k")
        assert store.list()[0].last_used_at is None
        store.verify(key)
        first = store.list()[0].last_used_at
        assert first is not None
        store.verify(key)
        assert store.list()[0].last_used_at == first  # within LAST_USED_RESOLUTION_S: no write


def test_the_key_file_is_private_and_a_planted_one_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    KeyStore(data).close()
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data / DB_FILE).st_mode) == 0o600
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    (tmp_path / "elsewhere.db").write_bytes(b"")
    (planted / DB_FILE).symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(SmartVMError) as err:
        KeyStore(planted)
    assert err.value.code is ErrorCode.UNSAFE_DIRECTORY
    (data / DB_FILE).chmod(0o644)  # as a looser umask of an older smartvm made it
    KeyStore(data).close()
    assert stat.S_IMODE(os.stat(data / DB_FILE).st_mode) == 0o600


def _smartvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smartvm.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_keys_cli_create_list_revoke(tmp_path: Path) -> None:
    made = _smartvm("keys", "create", "--name", "laptop", "--data-dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    with KeyStore(tmp_path) as store:
        assert store.verify(key) is not None
    listed = _smartvm("keys", "list", "--data-dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert "laptop" in listed.stdout and key[:12] in listed.stdout
    assert key not in listed.stdout + listed.stderr and key[12:20] not in listed.stdout
    revoked = _smartvm("keys", "revoke", "laptop", "--data-dir", str(tmp_path))
    assert revoked.returncode == 0, revoked.stderr
    with KeyStore(tmp_path) as store:
        assert store.verify(key) is None
    again = _smartvm("keys", "revoke", "laptop", "--data-dir", str(tmp_path))
    assert again.returncode == 2 and "API_KEY_NOT_FOUND" in again.stderr


def test_only_a_check_that_records_the_last_use_may_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service checks keys on its event loop; the rare check that writes goes to a thread."""
    with KeyStore(tmp_path) as store:
        key, _ = store.create("a")
        assert store.writes_on_verify(key)  # never used: the first check records it
        assert store.verify(key) is not None
        assert not store.writes_on_verify(key)  # a read only, for LAST_USED_RESOLUTION_S
        assert not store.writes_on_verify("not a key") and not store.writes_on_verify(None)
        monkeypatch.setattr(keys_module, "LAST_USED_RESOLUTION_S", 0.0)
        assert store.writes_on_verify(key)
