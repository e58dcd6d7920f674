"""Host TSC rate and the bounded, cached KVM probe."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

from smartvm import kvm_probe
from smartvm.qemu import host_clock
from smartvm.qemu.host_clock import host_tsc_khz, khz_from_kernel_log, measure_tsc_khz


def test_kernel_log_refined_value_wins() -> None:
    lines = [
        "[    0.000000] tsc: Detected 2300.000 MHz processor",
        "[    1.234567] tsc: Refined TSC clocksource calibration: 2294.687 MHz",
    ]
    assert khz_from_kernel_log(lines) == 2_294_687
    assert khz_from_kernel_log(lines[:1]) == 2_300_000
    assert khz_from_kernel_log(["tsc: Detected 3000.123 MHz TSC"]) == 3_000_123
    assert khz_from_kernel_log(["nothing here"]) is None


@pytest.mark.skipif(platform.machine() != "x86_64", reason="rdtsc is x86-64 only")
def test_measured_rate_agrees_with_the_hosts_value() -> None:
    measured, host = measure_tsc_khz(), host_tsc_khz()
    assert measured is not None and host is not None
    assert abs(measured - host) / host < 0.02


@pytest.mark.skipif(platform.machine() != "x86_64", reason="rdtsc is x86-64 only")
def test_the_rate_found_once_is_kept_for_this_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `smartvm run` on a host without the sysfs file would otherwise measure for ~150 ms."""
    monkeypatch.setenv("SMARTVM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(host_clock, "SYSFS_TSC_KHZ", tmp_path / "no-sysfs-file")
    kept = tmp_path / "host-tsc.json"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    try:
        kept.write_text(json.dumps({"boot_id": boot_id, "khz": 1_234_567}))
        host_tsc_khz.cache_clear()
        assert host_tsc_khz() == 1_234_567  # read back, not measured

        kept.write_text(json.dumps({"boot_id": "an earlier boot", "khz": 1_234_567}))
        host_tsc_khz.cache_clear()
        found, measured = host_tsc_khz(), measure_tsc_khz()  # found: from the kernel log or measured
        assert found is not None and measured is not None and abs(found - measured) / found < 0.02
        assert json.loads(kept.read_text()) == {"boot_id": boot_id, "khz": found}
    finally:
        host_tsc_khz.cache_clear()


def fake_qemu(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def test_probe_of_a_hanging_kvm_is_bounded_and_leaves_no_process(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, "echo 'KVM internal error. Suberror: 1' >&2; exec sleep 60")
    start = time.monotonic()
    result = kvm_probe.run_probe(str(qemu), None, timeout=1.0)
    assert time.monotonic() - start < 10
    assert not result.usable
    assert "KVM internal error" in result.reason
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).startswith("sleep 60")]


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_probe_of_a_spinning_kvm_times_out(tmp_path: Path) -> None:
    result = kvm_probe.run_probe(str(fake_qemu(tmp_path, "exec sleep 60")), None, timeout=0.5)
    assert not result.usable and "did not finish" in result.reason


def test_probe_result_is_cached_per_qemu_and_payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTVM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kvm_probe, "KVM_DEVICE", tmp_path / "kvm")
    (tmp_path / "kvm").touch()
    monkeypatch.setattr(kvm_probe, "_memory", {})
    monkeypatch.setattr(kvm_probe, "_default_kernel", lambda: None)
    calls: list[str] = []

    def fake_run(binary: str, kernel: Path | None, timeout: float = 4.0) -> kvm_probe.KvmProbe:
        calls.append(binary)
        return kvm_probe.KvmProbe(False, "fake says no", "reset-vector", 0.1)

    monkeypatch.setattr(kvm_probe, "run_probe", fake_run)
    qemu = fake_qemu(tmp_path, "exit 1")
    first = kvm_probe.probe_kvm(qemu)
    assert first == kvm_probe.probe_kvm(qemu) and len(calls) == 1  # memory cache
    monkeypatch.setattr(kvm_probe, "_memory", {})
    assert kvm_probe.probe_kvm(qemu) == first and len(calls) == 1  # file cache
    assert (tmp_path / "cache" / kvm_probe.CACHE_NAME).is_file()
    kvm_probe.probe_kvm(qemu, refresh=True)
    assert len(calls) == 2
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    kvm_probe.probe_kvm(qemu, kernel)  # a stronger payload is a new key
    assert len(calls) == 3
    assert kvm_probe.engine_accel("auto", qemu) == ("tcg", "KVM is not usable: fake says no")
    for i in range(kvm_probe._CACHE_ENTRIES + 5):  # temporary kernels must not grow the cache forever
        other = tmp_path / f"vmlinux{i}"
        other.write_bytes(b"\x7fELF")
        kvm_probe.probe_kvm(qemu, other)
    cached = json.loads((tmp_path / "cache" / kvm_probe.CACHE_NAME).read_text())
    assert len(cached) == kvm_probe._CACHE_ENTRIES
    newest = f"vmlinux{kvm_probe._CACHE_ENTRIES + 4}:"
    assert any(newest in key for key in cached) and not any("vmlinux0:" in key for key in cached)


def test_no_kvm_device_means_tcg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm_probe, "KVM_DEVICE", tmp_path / "missing-kvm")
    result = kvm_probe.probe_kvm()
    assert not result.usable and "does not exist" in result.reason
    assert kvm_probe.engine_accel("auto")[0] == "tcg"
    assert kvm_probe.engine_accel("kvm")[0] == "kvm"  # an explicit choice is honoured
    check = kvm_probe.check_kvm_guest()
    assert check.name == "kvm guest" and "TCG" in check.detail


def test_probe_cache_is_written_through_a_fresh_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a predictable ``kvm-probe.json.<pid>.part`` that a stale file or symlink could occupy."""
    monkeypatch.setenv("SMARTVM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "cache" / f"{kvm_probe.CACHE_NAME}.{os.getpid()}.part").symlink_to(victim)
    kvm_probe._write_cache("key", kvm_probe.KvmProbe(True, "ok"))
    assert victim.read_text() == "untouched"
    assert json.loads((tmp_path / "cache" / kvm_probe.CACHE_NAME).read_text())["key"]["usable"] is True
