"""Verified, atomic downloads against a real loopback HTTP server, and safe tar extraction."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_fixtures import FakeRemote, make_tar, serving, sha256_hex

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.download import download, parse_sha256_file, safe_extract

DATA = b"0123456789abcdef" * 4096


@pytest.fixture
def remote() -> Iterator[FakeRemote]:
    with serving() as server:
        yield server


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def test_download_verifies_and_renames(remote: FakeRemote, tmp_path: Path) -> None:
    url = remote.add("/files/blob", DATA)
    dest = tmp_path / "out" / "blob"
    result = await download(
        url, dest, sha256=sha256_hex(DATA), size=len(DATA), md5=hashlib.md5(DATA).hexdigest()
    )
    assert dest.read_bytes() == DATA
    assert result.size == len(DATA)
    assert result.sha256 == sha256_hex(DATA)
    assert _leftovers(dest.parent) == ["blob"]
    assert dest.stat().st_mode & 0o777 == 0o644


async def test_download_follows_redirects(remote: FakeRemote, tmp_path: Path) -> None:
    remote.add("/files/blob", DATA)
    url = remote.add("/files/moved", b"", 302, Location="/files/blob")
    await download(url, tmp_path / "blob", sha256=sha256_hex(DATA))
    assert (tmp_path / "blob").read_bytes() == DATA


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"sha256": "0" * 64}, "sha256 mismatch"),
        ({"size": len(DATA) + 1}, "size mismatch"),
        ({"size": len(DATA) - 1}, "more than the expected"),
        ({"md5": "0" * 32}, "md5 mismatch"),
    ],
)
async def test_mismatch_fails_and_leaves_nothing(
    remote: FakeRemote, tmp_path: Path, kwargs: dict[str, object], reason: str
) -> None:
    url = remote.add("/files/blob", DATA)
    dest = tmp_path / "blob"
    with pytest.raises(SmartVMError) as info:
        await download(url, dest, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == ErrorCode.DOWNLOAD_FAILED
    assert url in info.value.message
    assert reason in info.value.message
    assert _leftovers(tmp_path) == []


async def test_failed_download_keeps_the_previous_file(remote: FakeRemote, tmp_path: Path) -> None:
    url = remote.add("/files/blob", DATA)
    dest = tmp_path / "blob"
    dest.write_bytes(b"old and good")
    with raises_code(ErrorCode.DOWNLOAD_FAILED):
        await download(url, dest, sha256="1" * 64)
    assert dest.read_bytes() == b"old and good"
    assert _leftovers(tmp_path) == ["blob"]


@pytest.mark.parametrize("status", [404, 500])
async def test_http_errors_name_the_url(remote: FakeRemote, tmp_path: Path, status: int) -> None:
    url = f"{remote.url}/status/{status}"
    with pytest.raises(SmartVMError) as info:
        await download(url, tmp_path / "x")
    assert info.value.code == ErrorCode.DOWNLOAD_FAILED
    assert url in info.value.message
    assert f"HTTP {status}" in info.value.message
    assert _leftovers(tmp_path) == []


async def test_timeout_names_the_url(remote: FakeRemote, tmp_path: Path) -> None:
    url = f"{remote.url}/hang"
    with pytest.raises(SmartVMError) as info:
        await download(url, tmp_path / "x", timeout=0.3)
    assert info.value.code == ErrorCode.DOWNLOAD_FAILED
    assert url in info.value.message
    assert "timed out" in info.value.message
    assert _leftovers(tmp_path) == []


async def test_unreachable_host(tmp_path: Path) -> None:
    with pytest.raises(SmartVMError) as info:
        await download("http://127.0.0.1:9/nothing", tmp_path / "x", timeout=2)
    assert info.value.code == ErrorCode.DOWNLOAD_FAILED
    assert "127.0.0.1:9" in info.value.message


async def test_progress_bar_goes_to_stderr(
    remote: FakeRemote, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # rich draws nothing at all on a non-terminal with a transient bar: make the captured streams
    # count as terminals so a bar on the wrong stream would show up
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    url = remote.add("/files/blob", DATA)
    await download(url, tmp_path / "blob", sha256=sha256_hex(DATA), progress=True)
    assert (tmp_path / "blob").read_bytes() == DATA
    captured = capsys.readouterr()
    assert "blob" in captured.err  # the bar was drawn, on stderr
    assert captured.out == ""  # stdout stays clean for `smartvm images pull | tail -1`


async def test_bad_digest_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(SmartVMError) as info:
        await download("http://127.0.0.1:9/x", tmp_path / "x", sha256="abc")
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


def test_parse_sha256_file() -> None:
    digest = "A" * 64
    assert parse_sha256_file(f"{digest}  firecracker.tgz\n") == "a" * 64
    with pytest.raises(ValueError):
        parse_sha256_file("not a digest\n")
    with pytest.raises(ValueError):
        parse_sha256_file("")


# --- safe extraction -----------------------------------------------------------------------


def _tar_with(tmp_path: Path, *infos: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    path = tmp_path / "evil.tgz"
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("good/file")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        for info, data in infos:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "data", "why"),
    [
        (_member("/etc/evil"), b"x", "absolute path"),
        (_member("../evil"), b"x", "'..' in path"),
        (_member("good/../../evil"), b"x", "'..' in path"),
        (_member("good/link", tarfile.SYMTYPE, "../../etc/passwd"), None, "symlink"),
        (_member("good/abs", tarfile.SYMTYPE, "/etc/passwd"), None, "symlink"),
        (_member("good/hard", tarfile.LNKTYPE, "../outside"), None, "hardlink"),
        (_member("good/hard2", tarfile.LNKTYPE, "/etc/passwd"), None, "hardlink"),
        (_member("good/null", tarfile.CHRTYPE), None, "device"),
        (_member("good/disk", tarfile.BLKTYPE), None, "device"),
        (_member("good/pipe", tarfile.FIFOTYPE), None, "fifo"),
    ],
)
def test_unsafe_members_refuse_the_whole_archive(
    tmp_path: Path, member: tarfile.TarInfo, data: bytes | None, why: str
) -> None:
    archive = _tar_with(tmp_path, (member, data))
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(SmartVMError) as info:
        safe_extract(archive, dest)
    assert info.value.code == ErrorCode.UNSAFE_PATH
    assert why in info.value.message
    assert member.name in info.value.message
    assert _leftovers(dest) == []  # not even the safe member
    assert not (tmp_path / "dest" / "evil").exists() and not (tmp_path / "evil").exists()


def test_safe_archive_extracts_with_inside_links(tmp_path: Path) -> None:
    archive = _tar_with(
        tmp_path,
        (_member("good/sub", tarfile.DIRTYPE), None),
        (_member("good/link", tarfile.SYMTYPE, "file"), None),
        (_member("good/sub/up", tarfile.SYMTYPE, "../file"), None),
        (_member("good/hard", tarfile.LNKTYPE, "good/file"), None),
    )
    written = safe_extract(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "good" / "file").read_bytes() == b"ok"
    assert (tmp_path / "dest" / "good" / "link").read_bytes() == b"ok"
    assert (tmp_path / "dest" / "good" / "sub" / "up").read_bytes() == b"ok"
    assert (tmp_path / "dest" / "good" / "hard").read_bytes() == b"ok"
    assert len(written) == 5


def test_extract_selected_members_only(tmp_path: Path) -> None:
    archive = tmp_path / "a.tgz"
    archive.write_bytes(make_tar({"r/a": b"A", "r/b": b"B"}))
    safe_extract(archive, tmp_path / "d", ["r/b"])
    assert _leftovers(tmp_path / "d" / "r") == ["b"]
    with pytest.raises(SmartVMError) as info:
        safe_extract(archive, tmp_path / "e", ["r/missing"])
    assert info.value.code == ErrorCode.DOWNLOAD_FAILED


def test_damaged_archive(tmp_path: Path) -> None:
    archive = tmp_path / "a.tgz"
    archive.write_bytes(make_tar({"r/a": b"A" * 5000})[:40])
    with pytest.raises(SmartVMError) as info:
        safe_extract(archive, tmp_path / "d")
    assert info.value.code == ErrorCode.DOWNLOAD_FAILED
