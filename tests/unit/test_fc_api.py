"""The Firecracker API client against the spec-validating fake server on a real Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
from fc_fake.server import ApiServer
from fc_fake.spec import operations

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.api import Call, FirecrackerAPI, Resource

pytest_plugins = ["fc_fake.fixtures"]


@pytest.fixture
async def api(fake_server: ApiServer) -> AsyncIterator[FirecrackerAPI]:
    client = FirecrackerAPI(fake_server.socket_path)
    yield client
    await client.close()


async def _boot(api: FirecrackerAPI, kernel: Path) -> None:
    await api.boot.put(kernel_image_path=str(kernel), boot_args="console=ttyS0")
    await api.machine_config.put(vcpu_count=2, mem_size_mib=256)
    await api.actions.put(action_type="InstanceStart")


async def test_put_get_round_trip_drops_unset_fields(api: FirecrackerAPI, fake_server: ApiServer) -> None:
    await api.machine_config.put(vcpu_count=2, mem_size_mib=256, smt=None, track_dirty_pages=True)
    assert await api.machine_config.get() == {"vcpu_count": 2, "mem_size_mib": 256, "track_dirty_pages": True}
    sent = fake_server.fake.requests[0].body
    assert sent == {"vcpu_count": 2, "mem_size_mib": 256, "track_dirty_pages": True}


async def test_path_id_comes_from_the_body(
    api: FirecrackerAPI, fake_server: ApiServer, short_tmp: Path
) -> None:
    image = short_tmp / "root.img"
    image.write_bytes(b"\0" * 512)
    await api.drives.put(drive_id="rootfs", path_on_host=str(image), is_root_device=True, is_read_only=False)
    await api.network_interfaces.put(iface_id="eth0", host_dev_name="tap0", guest_mac=None)
    assert [(r.method, r.path) for r in fake_server.fake.requests] == [
        ("PUT", "/drives/rootfs"),
        ("PUT", "/network-interfaces/eth0"),
    ]
    with pytest.raises(SmartVMError) as err:
        await api.drives.put(path_on_host=str(image), is_root_device=False)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


async def test_unknown_field_is_rejected_with_fault_message(api: FirecrackerAPI) -> None:
    with pytest.raises(SmartVMError) as err:
        await api.machine_config.put(vcpu_count=1, mem_size_mib=128, vcpus=4)
    assert err.value.code is ErrorCode.FIRECRACKER_API_ERROR
    assert "PUT /machine-config" in err.value.message
    assert "HTTP 400" in err.value.message
    assert "vcpus" in err.value.message  # the fake's fault_message names the field


async def test_nested_unknown_field_and_wrong_type_are_rejected(api: FirecrackerAPI) -> None:
    with raises_code(ErrorCode.FIRECRACKER_API_ERROR, match="'two' is not of type 'integer'"):
        await api.machine_config.put(vcpu_count="two", mem_size_mib=128)
    with raises_code(ErrorCode.FIRECRACKER_API_ERROR, match="extra"):
        await api.entropy.put(rate_limiter={"bandwidth": {"size": 1, "refill_time": 1, "extra": 1}})
    with raises_code(ErrorCode.FIRECRACKER_API_ERROR, match="is not one of"):
        await api.actions.put(action_type="Reboot")
    with raises_code(ErrorCode.FIRECRACKER_API_ERROR, match="required"):
        await api.boot.put(boot_args="console=ttyS0")


async def test_patch_bodies_need_no_required_fields_and_log_level_off_is_valid(api: FirecrackerAPI) -> None:
    await api.machine_config.put(vcpu_count=1, mem_size_mib=128)
    await api.machine_config.patch(mem_size_mib=512)
    assert (await api.machine_config.get())["mem_size_mib"] == 512
    await api.logger.put(level="Off")  # YAML 1.1 would read the spec's `Off` as false


async def test_pre_boot_only_calls_are_refused_after_start(api: FirecrackerAPI, short_tmp: Path) -> None:
    with raises_code(ErrorCode.FIRECRACKER_API_ERROR, match=r"PATCH /vm .*before starting"):
        await api.vm.patch(state="Paused")
    with raises_code(ErrorCode.FIRECRACKER_API_ERROR, match="without kernel configuration"):
        await api.actions.put(action_type="InstanceStart")
    await _boot(api, short_tmp / "vmlinux")
    with raises_code(ErrorCode.FIRECRACKER_API_ERROR, match=r"PUT /machine-config .*after starting"):
        await api.machine_config.put(vcpu_count=1, mem_size_mib=128)
    await api.vm.patch(state="Paused")
    assert (await api.describe_instance.get())["state"] == "Paused"


async def test_instance_info_version_and_vm_config_reflect_the_configuration(
    api: FirecrackerAPI, short_tmp: Path
) -> None:
    assert (await api.describe_instance.get())["state"] == "Not started"
    assert (await api.version.get())["firecracker_version"]
    await api.vsock.put(guest_cid=3, uds_path=str(short_tmp / "v.sock"))
    await _boot(api, short_tmp / "vmlinux")
    info = await api.describe_instance.get()
    assert (info["app_name"], info["id"], info["state"]) == ("Firecracker", "test-vm", "Running")
    config = await api.vm_config.get()
    assert config["machine-config"] == {"vcpu_count": 2, "mem_size_mib": 256}
    assert config["boot-source"]["boot_args"] == "console=ttyS0"
    assert config["vsock"]["guest_cid"] == 3


async def test_mmds_takes_free_form_bodies(api: FirecrackerAPI) -> None:
    await api.mmds.put({"latest": {"meta-data": {"ami-id": "ami-1", "gone": 1}}})
    await api.mmds.patch({"latest": {"meta-data": {"gone": None, "new": "x"}}})
    assert await api.mmds.get() == {"latest": {"meta-data": {"ami-id": "ami-1", "new": "x"}}}


async def test_one_connection_is_reused(api: FirecrackerAPI, fake_server: ApiServer) -> None:
    for _ in range(20):
        await api.version.get()
    assert fake_server.connections == 1


async def test_unreachable_socket_is_no_client(short_tmp: Path) -> None:
    async with FirecrackerAPI(short_tmp / "missing.sock") as api:
        with pytest.raises(SmartVMError) as err:
            await api.version.get()
    assert err.value.code is ErrorCode.NO_CLIENT
    assert "missing.sock" in err.value.message


async def test_path_and_body_ids_must_match(api: FirecrackerAPI, short_tmp: Path) -> None:
    with raises_code(ErrorCode.FIRECRACKER_API_ERROR, match="does not match"):
        await api.request("PUT", "/network-interfaces/eth0", {"iface_id": "eth1", "host_dev_name": "tap0"})


def test_every_endpoint_of_the_spec_has_a_resource(short_tmp: Path) -> None:
    api = FirecrackerAPI(short_tmp / "x.sock")
    paths = {
        r.path + ("/{" + r.id_field + "}" if r.id_field else "")
        for r in vars(api).values()
        if isinstance(r, Resource)
    }
    spec_paths = {op.template for op in operations()}
    assert spec_paths - paths == set()
    assert {"/drives/{drive_id}", "/pmem/{id}", "/network-interfaces/{iface_id}"} <= paths


async def test_send_all_pipelines_on_one_connection_in_order(
    api: FirecrackerAPI, fake_server: ApiServer, short_tmp: Path
) -> None:
    calls = [
        api.boot.put_call(kernel_image_path=str(short_tmp / "vmlinux")),
        api.machine_config.put_call(vcpu_count=2, mem_size_mib=256),
        api.network_interfaces.put_call(iface_id="eth0", host_dev_name="tap0"),
        api.mmds_config.put_call(network_interfaces=["eth0"]),  # needs eth0: order matters
    ]
    assert await api.send_all(calls) == [None] * 4
    assert await api.machine_config.get() == {"vcpu_count": 2, "mem_size_mib": 256}
    assert [(r.method, r.path) for r in fake_server.fake.requests] == [
        *((c.method, c.path) for c in calls),
        ("GET", "/machine-config"),
    ]
    assert fake_server.connections == 1


async def test_send_all_names_the_first_failed_call_and_keeps_the_connection(
    api: FirecrackerAPI, fake_server: ApiServer
) -> None:
    calls = [
        api.machine_config.put_call(vcpu_count=1, mem_size_mib=128),
        api.logger.put_call(level="Loud"),
        api.entropy.put_call(bogus=1),
        api.metrics.put_call(metrics_path="/dev/null"),
    ]
    with pytest.raises(SmartVMError) as err:
        await api.send_all(calls)
    assert err.value.code is ErrorCode.FIRECRACKER_API_ERROR
    assert err.value.message.startswith("PUT /logger failed with HTTP 400: ")
    assert len(fake_server.fake.requests) == 4  # every answer was read: the stream stays in step
    assert (await api.version.get())["firecracker_version"]
    assert fake_server.connections == 1


# --- a scripted HTTP/1.1 server (h11, server side) for broken connections --------------------------
Action = str  # "ok", "ok-close" (answer, then close), "drop" (close unanswered), "cut", "hang"


@contextlib.asynccontextmanager
async def scripted(path: Path, actions: list[Action]) -> AsyncIterator[list[str]]:
    """Serve requests with ``actions`` in order, across connections; yields the request log."""
    log: list[str] = []
    script = iter(actions)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log.append("connect")
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    log.append(f"{event.method.decode()} {event.target.decode()}")
                if not isinstance(event, h11.EndOfMessage):
                    continue
                action = next(script)
                if action == "hang":
                    await asyncio.sleep(3600)
                if action == "drop":
                    return
                body = b'{"n": 1}'
                head = h11.Response(
                    status_code=200,
                    headers=[("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                if action == "cut":
                    writer.write(conn.send(head) + body[:3])
                    return
                writer.write(conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                await writer.drain()
                if action == "ok-close":
                    return
                conn.start_next_cycle()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    try:
        yield log
    finally:
        server.close()
        await server.wait_closed()


async def test_an_idle_connection_the_server_closed_is_replaced(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with scripted(sock, ["ok-close", "ok", "ok"]) as log, FirecrackerAPI(sock) as api:
        assert await api.request("GET", "/a") == {"n": 1}
        await asyncio.sleep(0.05)  # the close arrives while idle
        assert await api.request("PUT", "/actions", {"action_type": "FlushMetrics"}) == {"n": 1}
        assert await api.request("GET", "/c") == {"n": 1}
    assert log == ["connect", "GET /a", "connect", "PUT /actions", "GET /c"]


async def test_a_repeatable_call_is_resent_when_the_connection_closes_unanswered(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with scripted(sock, ["ok", "drop", "ok"]) as log, FirecrackerAPI(sock) as api:
        await api.request("GET", "/a")
        assert await api.machine_config.put(vcpu_count=1, mem_size_mib=128) == {"n": 1}
    assert log == ["connect", "GET /a", "PUT /machine-config", "connect", "PUT /machine-config"]


async def test_an_action_is_never_sent_twice(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with scripted(sock, ["ok", "drop", "ok"]) as log, FirecrackerAPI(sock) as api:
        await api.request("GET", "/a")
        with pytest.raises(SmartVMError) as err:
            await api.actions.put(action_type="InstanceStart")
        assert err.value.code is ErrorCode.NO_CLIENT
        assert "PUT /actions" in err.value.message and str(sock) in err.value.message
        assert await api.request("GET", "/b") == {"n": 1}  # a new connection for the next call
    assert log == ["connect", "GET /a", "PUT /actions", "connect", "GET /b"]


async def test_an_answer_cut_mid_body_is_no_client_and_not_resent(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with scripted(sock, ["ok", "cut", "ok"]) as log, FirecrackerAPI(sock) as api:
        await api.request("GET", "/a")
        with pytest.raises(SmartVMError) as err:
            await api.request("GET", "/b")
        assert err.value.code is ErrorCode.NO_CLIENT
        assert "GET /b" in err.value.message
        assert await api.request("GET", "/c") == {"n": 1}
    assert log == ["connect", "GET /a", "GET /b", "connect", "GET /c"]


async def test_a_call_that_is_not_answered_times_out_naming_it(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with scripted(sock, ["hang", "ok"]) as log, FirecrackerAPI(sock, timeout=0.2) as api:
        with pytest.raises(SmartVMError) as err:
            await api.machine_config.put(vcpu_count=1, mem_size_mib=128)
        assert err.value.code is ErrorCode.FIRECRACKER_API_ERROR
        assert "PUT /machine-config" in err.value.message and "did not answer" in err.value.message
        assert await api.request("GET", "/b") == {"n": 1}  # the stuck connection was given up
    assert log == ["connect", "PUT /machine-config", "connect", "GET /b"]


async def test_a_cancelled_call_leaves_no_stray_answer_for_the_next(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with scripted(sock, ["ok", "hang", "ok"]) as log, FirecrackerAPI(sock) as api:
        await api.request("GET", "/a")
        stuck = asyncio.create_task(api.request("GET", "/b"))
        for _ in range(500):
            if log[-1] == "GET /b":
                break
            await asyncio.sleep(0.01)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert await api.request("GET", "/c") == {"n": 1}
    assert log == ["connect", "GET /a", "GET /b", "connect", "GET /c"]


async def test_a_pipelined_batch_cut_midway_names_the_unanswered_call(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with scripted(sock, ["ok", "cut"]) as log, FirecrackerAPI(sock) as api:
        with pytest.raises(SmartVMError) as err:
            await api.send_all([Call("PUT", "/a", {}), Call("PUT", "/b", {}), Call("PUT", "/c", {})])
    assert err.value.code is ErrorCode.NO_CLIENT
    assert err.value.message.startswith("PUT /b: ")
    assert log[:3] == ["connect", "PUT /a", "PUT /b"]
