"""Claiming one of a VM's agent ports: a free one, never a held one, and a dead holder frees its port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smartvm.agent.wire import VIRTIO_PORT_NAME
from smartvm.errors import AgentBusyError, ErrorCode
from smartvm.host.runtime import VMRuntime
from smartvm.qemu.agent_ports import claim_port, port_name, port_socket


def test_names_and_sockets_keep_port_zero_as_it_was(tmp_path: Path) -> None:
    rt = VMRuntime(vm_id="vm1", dir=tmp_path)
    assert [port_name(i) for i in range(3)] == ["smartvm.agent", "smartvm.agent.1", "smartvm.agent.2"]
    assert port_name(0) == VIRTIO_PORT_NAME  # what the guest agent looks for
    assert port_socket(rt, 0) == rt.agent_socket == tmp_path / "agent.sock"
    assert port_socket(rt, 2) == tmp_path / "agent.2.sock"


def test_claims_take_free_ports_and_fail_at_once_when_all_are_held(tmp_path: Path) -> None:
    rt = VMRuntime(vm_id="vm1", dir=tmp_path)
    claims = [claim_port(rt, 3) for _ in range(3)]
    assert [c.index for c in claims] == [0, 1, 2]
    with pytest.raises(AgentBusyError) as busy:
        claim_port(rt, 3)
    assert busy.value.code == ErrorCode.AGENT_UNAVAILABLE
    assert "all 3 agent channels of VM 'vm1' are in use" in busy.value.message
    claims[1].release()
    claims[1].release()  # idempotent
    again = claim_port(rt, 3)
    assert again.index == 1 and again.held
    for c in claims:
        c.release()
    again.release()
    assert {p.stat().st_mode & 0o777 for p in tmp_path.glob("agent.*.lock")} == {0o600}


def test_a_port_held_by_a_killed_process_is_free_again(tmp_path: Path) -> None:
    rt = VMRuntime(vm_id="vm1", dir=tmp_path)
    code = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "agent.0.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(AgentBusyError):
            claim_port(rt, 1)
        holder.kill()
        holder.wait()
        claim = claim_port(rt, 1)
        assert claim.index == 0
        claim.release()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
