"""Per-slot network setup time: batched (smartvm) vs one ip/nft command per step, and pool acquire.

Run as root:  .venv/bin/python -m bench --only network_slots   (or: -m bench.network_slots --slots 20)
Creates at most --slots namespaces at a time under a unique prefix in 198.18.0.0/15 and removes
them all; prints median, p95 and the ratio to the one-command-per-step way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from bench.common import BenchTable, Series
from smartvm.host import nat, netlink_batch
from smartvm.host.nat import EgressPolicy
from smartvm.host.netlink_batch import run as run_command
from smartvm.host.netns import (
    GATEWAY_IP,
    TAP_NAME,
    UPLINK,
    NetworkSlot,
    SlotPool,
    _ns_nft,
    _transit,
    create_slots,
    destroy_slots,
    slot_store,
)

PER_STEP = "one ip/nft command per step"
PER_STEP_DOWN = "per step: ip link del, ip netns del, nft"


async def _step(*argv: str, stdin: str = "") -> None:
    res = await run_command(list(argv), stdin)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


async def per_step_setup(slot: NetworkSlot) -> None:
    """The original's way: every step its own ip (or nft) process."""
    ns, hv = slot.netns_name, slot.host_veth
    await _step("ip", "netns", "add", ns)
    await _step("ip", "link", "add", hv, "type", "veth", "peer", "name", UPLINK, "netns", ns)
    await _step("ip", "addr", "add", f"{slot.host_side_ip}/30", "dev", hv)
    await _step("ip", "link", "set", hv, "up")
    await _step("ip", "-n", ns, "link", "set", "lo", "up")
    await _step("ip", "-n", ns, "addr", "add", f"{slot.host_ip}/30", "dev", UPLINK)
    await _step("ip", "-n", ns, "link", "set", UPLINK, "up")
    await _step("ip", "-n", ns, "tuntap", "add", "dev", TAP_NAME, "mode", "tap")
    await _step("ip", "-n", ns, "addr", "add", f"{GATEWAY_IP}/30", "dev", TAP_NAME)
    await _step("ip", "-n", ns, "link", "set", TAP_NAME, "up")
    await _step("ip", "-n", ns, "route", "add", "default", "via", slot.host_side_ip)
    await _step("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    await _step("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=_ns_nft(slot, EgressPolicy.allow_all()))
    await _step("nft", "-f", "-", stdin=nat.host_table_script() + nat.host_add_script([hv], {}))


async def per_step_teardown(slot: NetworkSlot) -> None:
    await _step("ip", "link", "del", slot.host_veth)
    await _step("ip", "netns", "del", slot.netns_name)
    await _step("nft", "delete", "element", nat.FAMILY, nat.TABLE, "ifaces", f'{{ "{slot.host_veth}" }}')


def _available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    if shutil.which("nft") is None or shutil.which("ip") is None:
        return "needs iproute2 and nftables"
    return None


async def run(quick: bool, count: int | None = None) -> list[BenchTable]:
    """Per-slot setup several ways plus pool acquisition, and teardown (times per slot)."""
    count = count or (5 if quick else 20)
    title = f"network slot setup, per slot ({count} slots)"
    reason = _available()
    if reason:
        return [BenchTable(title, [], notes=[f"skipped: {reason}"])]
    prefix = "svb" + secrets.token_hex(2)
    transit = _transit(f"198.18.{random.randrange(256)}.0/24")
    series: list[Series] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = slot_store(Path(tmp), prefix, transit)

        per_step = Series(PER_STEP)
        per_step_down = Series(PER_STEP_DOWN)
        for _ in range(count):
            lease = store.allocate(f"{prefix}:{secrets.token_hex(4)}", {"kind": "slot", "prefix": prefix})
            slot = NetworkSlot._from_lease(lease, store, prefix, transit)
            try:
                t0 = time.perf_counter()
                await per_step_setup(slot)
                per_step.samples.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await per_step_teardown(slot)
                per_step_down.samples.append(time.perf_counter() - t0)
            finally:
                await destroy_slots([slot])
        series.append(per_step)

        made: list[NetworkSlot] = []

        async def one() -> None:
            made.extend(await create_slots(1, store=store, prefix=prefix, transit=transit))

        async def drop() -> None:
            await destroy_slots(made)
            made.clear()

        single = Series("smartvm: batched, one slot per call")
        for _ in range(count):
            t0 = time.perf_counter()
            await one()
            single.samples.append(time.perf_counter() - t0)
            await drop()
        series.append(single)

        with_command = Series("smartvm: batched, nft command instead of libnftables")
        saved = netlink_batch._libnft
        netlink_batch._libnft = netlink_batch._LibNft(use_library=False)
        try:
            for _ in range(count):
                t0 = time.perf_counter()
                await one()
                with_command.samples.append(time.perf_counter() - t0)
                await drop()
        finally:
            netlink_batch._libnft = saved
        series.append(with_command)

        t0 = time.perf_counter()
        batch = await create_slots(count, store=store, prefix=prefix, transit=transit)
        per_slot = (time.perf_counter() - t0) / count
        series.append(Series(f"smartvm: batched, {count} slots per call", [per_slot] * count))

        t0 = time.perf_counter()
        await destroy_slots(batch)
        per_slot = (time.perf_counter() - t0) / count
        teardown_many = Series(f"smartvm: {count} slots per call", [per_slot] * count)
        teardown_one = Series("smartvm: one slot per call")
        for _ in range(count):
            await one()
            t0 = time.perf_counter()
            await destroy_slots(made)
            teardown_one.samples.append(time.perf_counter() - t0)
            made.clear()

        for label, policy in (
            ("pool acquire (allow all)", None),
            ("pool acquire + deny-all egress policy", EgressPolicy.deny_all()),
        ):
            pool = SlotPool(
                count, prefix=prefix, transit=str(transit), state_dir=tmp, enable_ip_forward=False
            )
            try:
                await pool.start()
                acquire = Series(label)
                for _ in range(count):
                    t0 = time.perf_counter()
                    await pool.acquire(egress=policy)
                    acquire.samples.append(time.perf_counter() - t0)
                series.append(acquire)
            finally:
                await pool.close()
    nat.delete_host_table_if_unused_sync()
    return [
        BenchTable(
            title,
            series,
            baseline=PER_STEP,
            notes=[
                "per-step: every ip/nft/sysctl step its own process (the original's way); batched: one "
                "ip -batch on the host and one ip -n NS -batch per namespace; nftables through libnftables "
                "in-process",
                "pool acquire takes a pre-created slot; a policy other than allow-all costs one nftables "
                "transaction in the namespace",
            ],
        ),
        BenchTable(
            f"network slot teardown, per slot ({count} slots)",
            [per_step_down, teardown_one, teardown_many],
            baseline=PER_STEP_DOWN,
            notes=[
                "per-step: ip link del, ip netns del, nft delete element; smartvm: one netns del batch (the "
                "kernel destroys the devices), wait until the host veths are gone, one nft transaction",
            ],
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slots", type=int, default=20)
    args = parser.parse_args()
    if not 1 <= args.slots <= 100:
        sys.exit("--slots must be 1-100")
    for table in asyncio.run(run(False, args.slots)):
        table.render(Console(width=160))
