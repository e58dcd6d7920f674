"""A process that dies without cleaning up leaves leases; sweep removes its devices and releases them."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_support import Env, env_fixture, ip, leftovers, requires_netns

from smartvm.host import nat
from smartvm.host.network_doctor import inventory, sweep

pytestmark = [pytest.mark.network, requires_netns]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from env_fixture(tmp_path)


def _die_with_devices(env: Env, port: int) -> None:
    """A child that creates two slots (one with a port forward) and a TAP, then exits abruptly."""
    code = textwrap.dedent(f"""
        import asyncio, os
        from smartvm import NetworkManager, SlotPool

        async def main():
            pool = SlotPool(2, prefix={env.prefix!r}, transit={env.transit!r},
                            state_dir={str(env.state_dir)!r})
            await pool.start()
            await pool.acquire(port_forwards={{{port}: 80}})
            mgr = NetworkManager({env.prefix + "br"!r}, "198.19.{env.side_net}.0/28",
                                 state_dir={str(env.state_dir)!r}, name_prefix={env.prefix!r})
            await mgr.create_tap("doomed")
            os._exit(0)

        asyncio.run(main())
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_sweep_removes_devices_of_dead_owners(env: Env) -> None:
    port = random.randrange(40000, 50000)
    _die_with_devices(env, port)
    before = inventory(env.state_dir)
    assert len(before.dead) >= 4  # three slots (one acquired, two ready) or more, a TAP, the bridge
    assert before.leftover_namespaces  # unclaimed: their owner is dead
    elements = nat.host_elements_sync()
    assert elements is not None and port in elements[1]

    report = sweep(env.state_dir)
    assert report.released_leases and report.removed_namespaces and report.removed_links
    assert port in report.removed_ports
    assert leftovers(env.prefix, env.state_dir) == []
    assert sweep(env.state_dir).released_leases == []  # idempotent


def test_sweep_keeps_devices_of_live_owners_and_orphans_unless_asked(env: Env) -> None:
    orphan = f"{env.prefix}-ns99"
    env.helpers.append(orphan)
    ip("netns", "add", orphan)
    assert orphan in inventory(env.state_dir).leftover_namespaces
    assert orphan not in sweep(env.state_dir).removed_namespaces
    assert orphan in sweep(env.state_dir, orphans=True).removed_namespaces
