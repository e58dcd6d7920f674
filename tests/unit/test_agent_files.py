"""Guest file operations through AgentClient against the REAL guest agent running on the host."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from agent_harness import agent_fixture, agent_server_fixture  # noqa: F401

from error_support import raises_code
from smartvm.agent import AgentClient
from smartvm.errors import ErrorCode, SmartVMError


def _on_host(path: str) -> bool:
    return os.path.exists(path)


def _host_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def test_ten_mib_roundtrip_byte_identical(agent: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(10 * 1024 * 1024 + 123)
    target = str(tmp_path / "sub" / "big.bin")
    assert await agent.files.write(target, data, mode=0o600) == len(data)
    assert hashlib.sha256(_host_bytes(target)).digest() == hashlib.sha256(data).digest()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    back = await agent.files.read(target)
    assert back == data
    assert await agent.files.read(target, offset=10, length=100) == data[10:110]
    assert not [n for n in os.listdir(tmp_path / "sub") if n != "big.bin"]  # no temp files left


async def test_upload_and_download_stream_host_files(agent: AgentClient, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    src.chmod(0o751)
    assert await agent.files.upload(src, str(tmp_path / "in-guest.bin")) == src.stat().st_size
    assert stat.S_IMODE((tmp_path / "in-guest.bin").stat().st_mode) == 0o751
    dest = tmp_path / "down.bin"
    assert await agent.files.download(str(tmp_path / "in-guest.bin"), dest) == src.stat().st_size
    assert dest.read_bytes() == src.read_bytes()
    assert not (tmp_path / "down.bin.part").exists()
    with raises_code(ErrorCode.GUEST_FILE_ERROR):
        await agent.files.download(str(tmp_path / "missing"), tmp_path / "never")
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.part").exists()


async def test_text_unicode_names_append_and_mode_preserved(agent: AgentClient, tmp_path: Path) -> None:
    path = str(tmp_path / "ünï 文件.txt")
    await agent.files.write(path, "héllo\n")
    os.chmod(path, 0o640)
    await agent.files.write(path, "wörld\n")  # overwrite keeps the permissions
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    await agent.files.write(path, "more\n", append=True)
    assert await agent.files.read_text(path) == "wörld\nmore\n"
    await agent.files.write(str(tmp_path / "empty"), b"")
    assert await agent.files.read(str(tmp_path / "empty")) == b""


async def test_list_stat_mkdir_rename_remove(agent: AgentClient, tmp_path: Path) -> None:
    base = str(tmp_path)
    info = await agent.files.mkdir(f"{base}/a/b/c", mode=0o700)
    assert info.type == "dir" and info.mode == 0o700
    await agent.files.write(f"{base}/a/f.txt", b"12345")
    os.symlink("f.txt", f"{base}/a/link")
    entries = {e.name: e for e in await agent.files.list(f"{base}/a")}
    assert set(entries) == {"b", "f.txt", "link"}
    assert entries["f.txt"].size == 5 and entries["f.txt"].type == "file"
    assert entries["link"].type == "symlink" and entries["link"].target == "f.txt"
    st = await agent.files.stat(f"{base}/a/link")
    assert st.type == "file" and st.size == 5
    assert (await agent.files.stat(f"{base}/a/link", follow=False)).type == "symlink"
    assert await agent.files.exists(f"{base}/a/f.txt") and not await agent.files.exists(f"{base}/nope")
    await agent.files.rename(f"{base}/a/f.txt", f"{base}/a/g.txt")
    assert _on_host(f"{base}/a/g.txt") and not _on_host(f"{base}/a/f.txt")
    await agent.files.write(f"{base}/a/h.txt", b"h")
    with pytest.raises(SmartVMError) as exc:
        await agent.files.rename(f"{base}/a/h.txt", f"{base}/a/g.txt", overwrite=False)
    assert exc.value.code == ErrorCode.GUEST_FILE_ERROR
    with pytest.raises(SmartVMError) as exc:
        await agent.files.remove(f"{base}/a")  # not empty, not recursive
    assert exc.value.code == ErrorCode.GUEST_FILE_ERROR
    assert await agent.files.remove(f"{base}/a", recursive=True)
    assert not _on_host(f"{base}/a")
    assert not await agent.files.remove(f"{base}/a", missing_ok=True)


async def test_file_errors_have_stable_codes(agent: AgentClient, tmp_path: Path) -> None:
    for call in (
        agent.files.read(str(tmp_path / "missing")),
        agent.files.stat(str(tmp_path / "missing")),
        agent.files.list(str(tmp_path / "missing")),
        agent.files.read(str(tmp_path)),
        agent.files.remove(str(tmp_path / "missing")),
        agent.files.write(str(tmp_path / "f" / "x"), b"1", parents=False),
    ):
        with pytest.raises(SmartVMError) as exc:
            await call
        assert exc.value.code == ErrorCode.GUEST_FILE_ERROR, exc.value
    (tmp_path / "file").write_text("x")
    with pytest.raises(SmartVMError) as exc:
        await agent.files.write(str(tmp_path / "file" / "under-a-file"), os.urandom(1024 * 1024))
    assert exc.value.code == ErrorCode.GUEST_FILE_ERROR
    assert (await agent.exec("echo ok")).stdout == b"ok\n"  # still serving


async def test_listing_larger_than_one_frame_header(agent: AgentClient, tmp_path: Path) -> None:
    names = {f"{i:05d}-" + "n" * 120 for i in range(3000)}  # ~600 KiB of JSON: over MAX_HEADER_JSON
    for name in names:
        (tmp_path / name).touch()
    entries = await agent.files.list(str(tmp_path))
    assert {e.name for e in entries} == names


async def test_owner_of_write_and_mkdir_is_looked_up_like_a_command_user(
    agent: AgentClient, tmp_path: Path
) -> None:
    """``owner`` owns what a write or mkdir creates (not what already exists); a name, a uid or a
    numeric string name the account as ``user`` does for commands; anything else is refused."""

    def owners(*paths: Path) -> list[int]:
        return [p.stat().st_uid for p in paths]

    await agent.files.write(str(tmp_path / "w" / "f.txt"), b"x", owner="nobody")
    assert owners(tmp_path, tmp_path / "w", tmp_path / "w" / "f.txt") == [0, 65534, 65534]
    await agent.files.mkdir(str(tmp_path / "w" / "d1" / "d2"), owner="65534")
    assert owners(tmp_path / "w" / "d1", tmp_path / "w" / "d1" / "d2") == [65534, 65534]
    await agent.files.mkdir(str(tmp_path / "plain"), parents=False, owner=65534)
    assert owners(tmp_path / "plain") == [65534]

    with pytest.raises(SmartVMError) as exc:
        await agent.files.mkdir(str(tmp_path / "w" / "d1"), exist_ok=False)
    assert exc.value.code == ErrorCode.GUEST_FILE_ERROR and "EEXIST" in exc.value.message
    for bad in ("no-such-user-here", True):
        with pytest.raises(SmartVMError) as exc:
            await agent.files.write(str(tmp_path / "bad" / "f"), b"x", owner=bad)  # type: ignore[arg-type]
        assert exc.value.code == ErrorCode.INVALID_ARGUMENT, bad
    assert not (tmp_path / "bad").exists()
