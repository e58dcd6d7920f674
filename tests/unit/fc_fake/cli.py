"""A tiny fake ``firecracker`` executable: real CLI flags, the fake API at ``--api-sock``.

Failure behaviours for tests, chosen with environment variables:
  FAKE_FC_MODE=exit       print a log line and exit 1 at once
  FAKE_FC_MODE=nosocket   never create the API socket (sleeps)
  FAKE_FC_FAIL="PUT /drives/rootfs"   answer 400 on that endpoint
  FAKE_FC_HANG="PUT /actions"         never answer on that endpoint
  FAKE_FC_IGNORE_CTRLALTDEL=1         keep running after SendCtrlAltDel
  FAKE_FC_IGNORE_SIGTERM=1            ignore SIGTERM (needs SIGKILL)
  FAKE_FC_REQUEST_LOG=path            append every request as a JSON line
  FAKE_FC_VERSION=1.16.1              the version to report (API and --version)
  FAKE_FC_AGENT_SOCKET=path           vsock port 52 leads to the real guest agent listening there
                                      (else the vsock echoes), refused for FAKE_FC_AGENT_DELAY seconds
                                      after start/restore like a booting guest; FAKE_FC_AGENT_LOG=path
                                      gets every byte the host sent to it

Like Firecracker it refuses a flag given twice. Run under the fake jailer (jailer.py) it is chrooted
and sees only the jail's paths.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .server import VERSION, ApiServer, FakeFirecracker, serve_vsock_agent, serve_vsock_echo

# Firecracker's config file keys -> (method, path, id field) of the API call that applies them.
_CONFIG_FILE_KEYS = {
    "boot-source": "/boot-source",
    "machine-config": "/machine-config",
    "cpu-config": "/cpu-config",
    "balloon": "/balloon",
    "vsock": "/vsock",
    "logger": "/logger",
    "metrics": "/metrics",
    "mmds-config": "/mmds/config",
    "entropy": "/entropy",
    "serial": "/serial",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firecracker", allow_abbrev=False)
    p.add_argument("--api-sock", default="/run/firecracker.socket")
    p.add_argument("--id", default="anonymous-instance")
    p.add_argument("--log-path")
    p.add_argument("--level")
    p.add_argument("--module")
    p.add_argument("--show-level", action="store_true")
    p.add_argument("--show-log-origin", action="store_true")
    p.add_argument("--metrics-path")
    p.add_argument("--boot-timer", action="store_true")
    p.add_argument("--config-file")
    p.add_argument("--no-api", action="store_true")
    p.add_argument("--no-seccomp", action="store_true")
    p.add_argument("--seccomp-filter")
    p.add_argument("--metadata")
    p.add_argument("--mmds-size-limit")
    p.add_argument("--http-api-max-payload-size")
    p.add_argument("--start-time-us")
    p.add_argument("--start-time-cpu-us")
    p.add_argument("--parent-cpu-time-us")
    p.add_argument("--enable-pci", action="store_true")
    p.add_argument("--version", action="store_true")
    return p


def _log(args: argparse.Namespace, line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    if args.log_path:
        with open(args.log_path, "a") as f:
            f.write(line + "\n")


def _apply_config_file(fake: FakeFirecracker, path: str) -> None:
    config: dict[str, Any] = json.loads(Path(path).read_text())
    for key, value in config.items():
        if key in _CONFIG_FILE_KEYS:
            calls = [("PUT", _CONFIG_FILE_KEYS[key], value)]
        elif key == "drives":
            calls = [("PUT", f"/drives/{d['drive_id']}", d) for d in value]
        elif key == "network-interfaces":
            calls = [("PUT", f"/network-interfaces/{n['iface_id']}", n) for n in value]
        else:
            raise SystemExit(f"Configuration error: unknown field {key!r} in {path}")
        for method, api_path, body in calls:
            status, answer = fake.handle(method, api_path, json.dumps(body).encode())
            if status >= 300:
                raise SystemExit(f"Configuration error: {answer['fault_message']}")
    status, answer = fake.handle("PUT", "/actions", b'{"action_type": "InstanceStart"}')
    if status >= 300:
        raise SystemExit(f"Start microvm error: {answer['fault_message']}")


def main(argv: list[str]) -> int:
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    repeated = next((f for f in flags if flags.count(f) > 1), None)
    if repeated:  # like Firecracker's own argument parser (a jailer passes --id itself)
        print(
            f"Arguments parsing error: The argument '{repeated[2:]}' was provided more than once.",
            file=sys.stderr,
            flush=True,
        )
        return 1
    args = _parser().parse_args(argv)
    version = os.environ.get("FAKE_FC_VERSION", VERSION)
    if args.version:
        print(f"Firecracker v{version}\n\nSupported snapshot data format versions: v8.0.0")
        return 0
    mode = os.environ.get("FAKE_FC_MODE", "")
    _log(args, f"Running Firecracker v{version} (fake) id={args.id}")
    if mode == "exit":
        _log(args, "Error: RunWithApi(FailedToBindSocket): fake firecracker was told to fail")
        return 1
    if os.environ.get("FAKE_FC_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    done = threading.Event()

    def on_start(fake: FakeFirecracker) -> None:
        print("SMARTVM_INIT_READY", flush=True)  # the guest's serial console is our stdout
        vsock = fake.state.config.get("vsock")
        agent = os.environ.get("FAKE_FC_AGENT_SOCKET")
        if vsock and agent:
            log = os.environ.get("FAKE_FC_AGENT_LOG")
            delay = float(os.environ.get("FAKE_FC_AGENT_DELAY", "0"))
            serve_vsock_agent(
                Path(vsock["uds_path"]), Path(agent), ready_after=delay, log=Path(log) if log else None
            )
        elif vsock:
            serve_vsock_echo(Path(vsock["uds_path"]))

    def on_ctrl_alt_del(_fake: FakeFirecracker) -> None:
        print("reboot: Restarting system", flush=True)
        if not os.environ.get("FAKE_FC_IGNORE_CTRLALTDEL"):
            threading.Timer(0.05, done.set).start()  # like reboot=k: the VMM exits

    log = os.environ.get("FAKE_FC_REQUEST_LOG")
    fake = FakeFirecracker(
        args.id,
        fail=os.environ.get("FAKE_FC_FAIL"),
        hang=os.environ.get("FAKE_FC_HANG"),
        request_log=Path(log) if log else None,
        on_start=on_start,
        on_ctrl_alt_del=on_ctrl_alt_del,
        version=version,
    )
    if args.config_file:
        try:
            _apply_config_file(fake, args.config_file)
        except SystemExit as exc:
            _log(args, str(exc.code))
            return 1
    if mode == "nosocket" or args.no_api:
        done.wait(300)
        return 0
    if os.path.exists(args.api_sock):
        _log(args, f'Error: RunWithApi(FailedToBindSocket("{args.api_sock}")): Address in use')
        return 1
    server = ApiServer(Path(args.api_sock), fake).start()
    done.wait(300)
    time.sleep(0.01)
    server.stop()
    _log(args, "Firecracker exiting successfully. exit_code=0")
    return 0


def write_launcher(directory: Path, name: str, module: str) -> Path:
    """Write an executable script ``directory/name`` that runs ``main(sys.argv[1:])`` of ``module``
    (a module of this package, e.g. ``fc_fake.jailer``)."""
    path = directory / name
    tests_unit = Path(__file__).resolve().parents[1]
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(tests_unit)!r})\n"
        f"from {module} import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    path.chmod(0o755)
    return path


def write_fake_binary(directory: Path) -> Path:
    """Write an executable ``firecracker`` script into ``directory`` that runs this fake."""
    return write_launcher(directory, "firecracker", "fc_fake.cli")
