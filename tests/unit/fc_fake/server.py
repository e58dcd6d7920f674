"""The fake Firecracker API: spec validation, a small VMM state machine and an HTTP server on a
real Unix socket (stdlib ``http.server``, one thread per connection, keep-alive like Firecracker).

Every request is recorded (``FakeFirecracker.requests``, and as JSON lines in ``request_log``) so
tests can assert that everything our client sent validated.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from .spec import SpecError, match, validate

VERSION = "1.17.0-dev"
MEM_PAGE = 4096
FULL_MEMORY_MARKER = b"\x00fake-guest-memory"
PRE_BOOT_ONLY = {
    ("PUT", "/boot-source"),
    ("PUT", "/cpu-config"),
    ("PUT", "/drives/{drive_id}"),
    ("PUT", "/pmem/{id}"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/mmds/config"),
    ("PUT", "/entropy"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PUT", "/snapshot/load"),
    ("PUT", "/vsock"),
    ("PUT", "/balloon"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/serial"),
    ("PUT", "/hotplug/memory"),
}
POST_BOOT_ONLY = {
    ("PATCH", "/drives/{drive_id}"),
    ("PATCH", "/pmem/{id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/snapshot/create"),
    ("PATCH", "/vm"),
    ("PATCH", "/balloon"),
    ("PATCH", "/balloon/statistics"),
    ("PATCH", "/balloon/hinting/start"),
    ("PATCH", "/balloon/hinting/stop"),
    ("PATCH", "/hotplug/memory"),
}
UNRELEASED_FIELDS = {("PUT", "/snapshot/load"): ("vsock_override",)}
# Configuring any of these before /snapshot/load makes Firecracker refuse the load.
BOOT_SPECIFIC = PRE_BOOT_ONLY - {("PUT", "/snapshot/load"), ("PUT", "/logger"), ("PUT", "/metrics")}


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    status: int
    fault: str | None


@dataclass
class VmmState:
    instance_id: str
    config: dict[str, Any] = field(default_factory=dict)
    drives: dict[str, dict[str, Any]] = field(default_factory=dict)
    ifaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    pmem: dict[str, dict[str, Any]] = field(default_factory=dict)
    mmds: Any = None
    started: bool = False
    paused: bool = False
    diff_count: int = 0  # Diff snapshots since the last Full one (or the load)
    configured_boot: bool = False


class FakeFirecracker:
    """State and request handling, independent of the transport."""

    def __init__(
        self,
        instance_id: str = "anonymous-instance",
        *,
        fail: str | None = None,
        hang: str | None = None,
        request_log: Path | None = None,
        on_start: Any = None,
        on_ctrl_alt_del: Any = None,
        version: str = VERSION,
    ) -> None:
        self.state = VmmState(instance_id)
        self.version = version
        self.fail = fail  # "METHOD /path": answer 400 there
        self.hang = hang  # "METHOD /path": never answer there
        self.request_log = request_log
        self.requests: list[Recorded] = []
        self.on_start = on_start
        self.on_ctrl_alt_del = on_ctrl_alt_del
        self.lock = threading.Lock()

    # --- transport-independent entry point ---------------------------------------------------
    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        body: Any = None
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise SpecError(400, f"Cannot deserialize the json body of a request: {exc}") from None
            if self.hang == f"{method} {path}":
                while True:
                    time.sleep(3600)
            if self.fail == f"{method} {path}":
                raise SpecError(400, f"fake failure injected for {method} {path}")
            op, path_value = match(method, path)
            validate(op, path_value, body)
            self._check_released(op.method, op.template, body)
            with self.lock:
                status, answer = self._dispatch(op.method, op.template, path_value, body)
        except SpecError as exc:
            status, answer = exc.status, {"fault_message": exc.message}
        self._record(method, path, body, status, answer)
        return status, answer

    def _record(self, method: str, path: str, body: Any, status: int, answer: Any) -> None:
        fault = answer.get("fault_message") if isinstance(answer, dict) and status >= 300 else None
        rec = Recorded(method, path, body, status, fault)
        self.requests.append(rec)
        if self.request_log is not None:
            with self.request_log.open("a") as f:
                f.write(json.dumps(rec.__dict__) + "\n")

    def _check_released(self, method: str, template: str, body: Any) -> None:
        """Older releases reject fields that are new in 1.17 (unknown fields are errors)."""
        if self.version.startswith("1.17") or not isinstance(body, dict):
            return
        for field_name in UNRELEASED_FIELDS.get((method, template), ()):
            if field_name in body:
                raise SpecError(400, f"unknown field `{field_name}` (Firecracker v{self.version})")

    # --- the VMM -------------------------------------------------------------------------------
    def _dispatch(self, method: str, template: str, path_value: str | None, body: Any) -> tuple[int, Any]:
        st = self.state
        key = (method, template)
        if key in PRE_BOOT_ONLY and st.started:
            raise SpecError(400, "The requested operation is not supported after starting the microVM.")
        if key in POST_BOOT_ONLY and not st.started:
            raise SpecError(400, "The requested operation is not supported before starting the microVM.")
        if key in BOOT_SPECIFIC:
            st.configured_boot = True
        handler = getattr(
            self,
            "_"
            + method.lower()
            + template.replace("/", "_").replace("-", "_").replace("{", "").replace("}", ""),
            None,
        )
        if handler is not None:
            result: tuple[int, Any] = handler(path_value, body)
            return result
        if method == "PUT":
            st.config[template.strip("/").replace("/", "-")] = body
            return 204, None
        if method == "GET":
            return 200, st.config.get(template.strip("/").replace("/", "-"), {})
        return 204, None

    def _get_(self, _id: str | None, _body: Any) -> tuple[int, Any]:
        st = self.state
        state = "Paused" if st.paused else ("Running" if st.started else "Not started")
        info = {"app_name": "Firecracker", "id": st.instance_id, "state": state, "vmm_version": self.version}
        return 200, info

    def _get_version(self, _id: str | None, _body: Any) -> tuple[int, Any]:
        return 200, {"firecracker_version": self.version}

    def _put_machine_config(self, _id: str | None, body: Any) -> tuple[int, Any]:
        if body.get("smt") and body["vcpu_count"] > 1 and body["vcpu_count"] % 2:
            raise SpecError(400, "The vCPU number can only be 1 or an even number when SMT is enabled.")
        self.state.config["machine-config"] = body
        return 204, None

    def _patch_machine_config(self, _id: str | None, body: Any) -> tuple[int, Any]:
        self.state.config.setdefault("machine-config", {"vcpu_count": 1, "mem_size_mib": 128}).update(body)
        return 204, None

    def _get_machine_config(self, _id: str | None, _body: Any) -> tuple[int, Any]:
        return 200, self.state.config.get("machine-config", {"vcpu_count": 1, "mem_size_mib": 128})

    def _put_drives_drive_id(self, drive_id: str | None, body: Any) -> tuple[int, Any]:
        if not Path(body.get("path_on_host", "")).is_file():
            raise SpecError(400, f"Cannot create the block device: no file {body.get('path_on_host')}")
        if body["is_root_device"] and any(
            d["is_root_device"] for k, d in self.state.drives.items() if k != drive_id
        ):
            raise SpecError(400, "A root block device already exists!")
        self.state.drives[str(drive_id)] = body
        return 204, None

    def _patch_drives_drive_id(self, drive_id: str | None, body: Any) -> tuple[int, Any]:
        drive = self.state.drives.get(str(drive_id))
        if drive is None:
            raise SpecError(400, f"Invalid block device ID: {drive_id}")
        if "path_on_host" in body and not Path(body["path_on_host"]).is_file():
            raise SpecError(400, f"Unable to patch the block device: No such file {body['path_on_host']}")
        drive.update({k: v for k, v in body.items() if k != "drive_id"})
        return 204, None

    def _put_network_interfaces_iface_id(self, iface_id: str | None, body: Any) -> tuple[int, Any]:
        self.state.ifaces[str(iface_id)] = body
        return 204, None

    def _patch_network_interfaces_iface_id(self, iface_id: str | None, body: Any) -> tuple[int, Any]:
        iface = self.state.ifaces.get(str(iface_id))
        if iface is None:
            raise SpecError(400, f"Invalid network interface ID: {iface_id}")
        iface.update({k: v for k, v in body.items() if k != "iface_id"})
        return 204, None

    def _put_pmem_id(self, pmem_id: str | None, body: Any) -> tuple[int, Any]:
        self.state.pmem[str(pmem_id)] = body
        return 204, None

    def _put_mmds_config(self, _id: str | None, body: Any) -> tuple[int, Any]:
        unknown = set(body["network_interfaces"]) - set(self.state.ifaces)
        if unknown:
            raise SpecError(400, f"MMDS: unknown network interface IDs {sorted(unknown)}")
        self.state.config["mmds-config"] = body
        return 204, None

    def _put_mmds(self, _id: str | None, body: Any) -> tuple[int, Any]:
        self.state.mmds = body
        return 204, None

    def _patch_mmds(self, _id: str | None, body: Any) -> tuple[int, Any]:
        if self.state.mmds is None:
            raise SpecError(400, "The MMDS data store is not initialized.")
        _merge_patch(self.state.mmds, body)
        return 204, None

    def _get_mmds(self, _id: str | None, _body: Any) -> tuple[int, Any]:
        if self.state.mmds is None:
            raise SpecError(404, "The MMDS data store is not initialized.")
        return 200, self.state.mmds

    def _put_vsock(self, _id: str | None, body: Any) -> tuple[int, Any]:
        self.state.config["vsock"] = body
        return 204, None

    def _patch_balloon(self, _id: str | None, body: Any) -> tuple[int, Any]:
        balloon = self.state.config.get("balloon")
        if balloon is None:
            raise SpecError(400, "Invalid request: the balloon device is not configured.")
        balloon["amount_mib"] = body["amount_mib"]
        return 204, None

    def _get_balloon_statistics(self, _id: str | None, _body: Any) -> tuple[int, Any]:
        balloon = self.state.config.get("balloon")
        if not balloon or not balloon.get("stats_polling_interval_s"):
            raise SpecError(400, "Statistics for the balloon device are not enabled")
        mib = balloon["amount_mib"]
        pages = mib * 256
        return 200, {"target_pages": pages, "actual_pages": pages, "target_mib": mib, "actual_mib": mib}

    def _put_actions(self, _id: str | None, body: Any) -> tuple[int, Any]:
        st = self.state
        action = body["action_type"]
        if action == "InstanceStart":
            if st.started:
                raise SpecError(400, "The requested operation is not supported after starting the microVM.")
            if "boot-source" not in st.config:
                raise SpecError(400, "Cannot start microvm without kernel configuration.")
            st.started = True
            if self.on_start is not None:
                self.on_start(self)
        elif action == "SendCtrlAltDel":
            if not st.started:
                raise SpecError(400, "The requested operation is not supported before starting the microVM.")
            if self.on_ctrl_alt_del is not None:
                self.on_ctrl_alt_del(self)
        elif action == "FlushMetrics":
            if "metrics" not in st.config:
                raise SpecError(400, "The metrics system is not initialized.")
            line = {"utc_timestamp_ms": int(time.time() * 1000), "api_server": {"process_startup_time_us": 1}}
            with Path(st.config["metrics"]["metrics_path"]).open("a") as f:
                f.write(json.dumps(line) + "\n")
        return 204, None

    def _patch_vm(self, _id: str | None, body: Any) -> tuple[int, Any]:
        self.state.paused = body["state"] == "Paused"
        return 204, None

    def _put_snapshot_create(self, _id: str | None, body: Any) -> tuple[int, Any]:
        st = self.state
        if not st.paused:
            raise SpecError(400, "Cannot create a snapshot: the microVM is not paused.")
        diff = body.get("snapshot_type") == "Diff"
        if diff and not st.config.get("machine-config", {}).get("track_dirty_pages"):
            raise SpecError(400, "Diff snapshots need dirty page tracking (track_dirty_pages).")
        state = {"fake_firecracker_snapshot": 1, "config": self._full_config()}  # MMDS data is not saved
        Path(body["snapshot_path"]).write_text(json.dumps(state))
        mem_mib = st.config.get("machine-config", {}).get("mem_size_mib", 128)
        mem_path = Path(body["mem_file_path"])
        # Full: the whole memory (a marker at offset 0). Diff: a fresh sparse file holding only the
        # pages dirtied since the previous snapshot (one marker page per Diff), like Firecracker's.
        st.diff_count = st.diff_count + 1 if diff else 0
        with mem_path.open("wb") as f:
            if diff:
                f.seek(st.diff_count * MEM_PAGE)
                f.write(b"\x01diff-%d" % st.diff_count)
            else:
                f.write(FULL_MEMORY_MARKER)
            f.truncate(mem_mib << 20)  # sparse, like guest memory that was never touched
        return 204, None

    def _put_snapshot_load(self, _id: str | None, body: Any) -> tuple[int, Any]:
        st = self.state
        if st.configured_boot:
            raise SpecError(400, "Loading a snapshot is not allowed after configuring boot resources.")
        if ("mem_file_path" in body) == ("mem_backend" in body):
            raise SpecError(400, "Exactly one of mem_file_path or mem_backend must be given.")
        mem = body["mem_backend"]["backend_path"] if "mem_backend" in body else body["mem_file_path"]
        if not Path(mem).exists():
            raise SpecError(400, f"Cannot open the memory file {mem}: No such file or directory")
        if "mem_backend" not in body or body["mem_backend"]["backend_type"] == "File":
            with open(mem, "rb") as f:
                if f.read(len(FULL_MEMORY_MARKER)) != FULL_MEMORY_MARKER:
                    raise SpecError(
                        400,
                        f"Cannot restore the guest memory from {mem}: it is not a full "
                        "memory image (a Diff layer without its base?)",
                    )
                # later Diffs continue after the layers this memory already holds
                while f.seek((st.diff_count + 1) * MEM_PAGE) and f.read(6) == b"\x01diff-":
                    st.diff_count += 1
        try:
            state = json.loads(Path(body["snapshot_path"]).read_text())
        except (OSError, ValueError) as exc:
            raise SpecError(400, f"Cannot load the state from {body['snapshot_path']}: {exc}") from None
        full = state["config"]
        for drive in full.get("drives", []):  # Firecracker reopens every disk at its recorded path
            if not Path(drive["path_on_host"]).exists():
                raise SpecError(
                    400, f"Cannot restore devices: block {drive['drive_id']}: no file {drive['path_on_host']}"
                )
        st.config = {k: v for k, v in full.items() if k not in ("drives", "network-interfaces", "pmem")}
        st.drives = {d["drive_id"]: d for d in full.get("drives", [])}
        st.ifaces = {i["iface_id"]: i for i in full.get("network-interfaces", [])}
        for override in body.get("network_overrides", []):
            if override["iface_id"] not in st.ifaces:
                raise SpecError(400, f"Invalid network interface ID in overrides: {override['iface_id']}")
            st.ifaces[override["iface_id"]]["host_dev_name"] = override["host_dev_name"]
        if "vsock_override" in body and "vsock" in st.config:
            st.config["vsock"]["uds_path"] = body["vsock_override"]["uds_path"]
        if body.get("track_dirty_pages") or body.get("enable_diff_snapshots"):
            st.config.setdefault("machine-config", {})["track_dirty_pages"] = True
        st.started = True
        st.paused = not body.get("resume_vm", False)
        if self.on_start is not None:
            self.on_start(self)
        return 204, None

    def _get_vm_config(self, _id: str | None, _body: Any) -> tuple[int, Any]:
        return 200, self._full_config()

    def _full_config(self) -> dict[str, Any]:
        st = self.state
        full: dict[str, Any] = {k: v for k, v in st.config.items() if k not in ("actions",)}
        full["drives"] = list(st.drives.values())
        full["network-interfaces"] = list(st.ifaces.values())
        if st.pmem:
            full["pmem"] = list(st.pmem.values())
        return json.loads(json.dumps(full))  # type: ignore[no-any-return]


def _merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7396 JSON merge patch, as Firecracker applies to MMDS."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_patch(target[key], value)
        else:
            target[key] = value


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UnixHTTPServer

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, answer = self.server.fake.handle(self.command, self.path, raw)
        data = b"" if answer is None or status == 204 else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Server", "Firecracker API")
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_PATCH = _serve

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, fake: FakeFirecracker) -> None:
        self.fake = fake
        self.connections = 0
        super().__init__(path, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        self.connections += 1
        return super().get_request()


class ApiServer:
    """Serve a FakeFirecracker on a Unix socket from a background thread."""

    def __init__(self, socket_path: Path, fake: FakeFirecracker) -> None:
        self.socket_path = socket_path
        self.fake = fake
        self._server = _UnixHTTPServer(str(socket_path), fake)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def connections(self) -> int:
        """How many client connections were accepted so far."""
        return self._server.connections

    def start(self) -> ApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self.socket_path.unlink(missing_ok=True)


def serve_vsock_agent(
    uds_path: Path, agent_socket: Path, *, ready_after: float = 0.0, log: Path | None = None, port: int = 52
) -> threading.Thread:
    """Firecracker's host-initiated vsock in front of a real guest agent (listening on the Unix socket
    ``agent_socket``): like a booting guest, ``CONNECT`` is refused (connection closed) until
    ``ready_after`` seconds have passed, then every connection is spliced to the agent. ``log`` gets
    every byte the host sent, so tests can see which requests went out in which order."""
    ready_at = time.monotonic() + ready_after
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(uds_path))
    listener.listen(8)
    lock = threading.Lock()

    def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record and log is not None:
                    with lock, open(log, "ab") as f:
                        f.write(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def peer(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            if f.readline() != f"CONNECT {port}\n".encode() or time.monotonic() < ready_at:
                return  # like Firecracker: no guest listener (yet) -> connection closed
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as agent:
                agent.connect(str(agent_socket))
                conn.sendall(b"OK 1073741824\n")  # the host sends nothing more before this answer
                back = threading.Thread(target=pump, args=(agent, conn, False), daemon=True)
                back.start()
                pump(conn, agent, True)
                back.join()

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=peer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread


def serve_vsock_echo(uds_path: Path, port: int = 52) -> threading.Thread:
    """Firecracker's host-initiated vsock: answer ``CONNECT <port>`` with ``OK``, then echo bytes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(uds_path))
    listener.listen(8)

    def peer(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            line = f.readline()
            if line != f"CONNECT {port}\n".encode():
                return  # like Firecracker: no guest listener -> connection closed
            conn.sendall(b"OK 1073741824\n")
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=peer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread
