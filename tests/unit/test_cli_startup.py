"""Start-up of ``import smartvm`` and the ``smartvm`` command: only what the command needs is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

import smartvm
from smartvm.cli.main import COMMAND_MODULES, build_app


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def _commands(app: typer.Typer) -> set[str]:
    return set(typer.main.get_group(app).commands)


def test_import_smartvm_loads_no_heavy_dependency() -> None:
    res = _python(
        "import sys, smartvm\n"
        "heavy = {'pydantic', 'typer', 'rich', 'httpx', 'smartvm.config'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "from smartvm import SmartVM, SmartVMOptions, ErrorCode\n"
        "from smartvm.orchestrator import SmartVM as S\n"
        "assert SmartVM is S and SmartVMOptions.__name__ == 'SmartVMOptions' and ErrorCode.NO_CLIENT\n"
    )
    assert res.returncode == 0, res.stderr


def test_every_public_name_resolves() -> None:
    for name in smartvm.__all__:
        assert getattr(smartvm, name) is not None
    assert set(smartvm.__all__) <= set(dir(smartvm))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        smartvm.Nope  # noqa: B018


@pytest.mark.parametrize(
    "entry", [["-m", "smartvm.cli"], ["-c", "from smartvm.cli.main import main; main()"]]
)
def test_version_is_printed_without_typer(entry: list[str]) -> None:
    res = subprocess.run(
        [sys.executable, "-X", "importtime", *entry, "--version"], capture_output=True, text=True, timeout=60
    )
    assert (res.returncode, res.stdout) == (0, f"smartvm {smartvm.__version__}\n")
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines()}
    assert not imported & {"typer", "rich", "pydantic", "smartvm.cli.vm"}


def test_version_option_still_works_among_other_arguments() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "smartvm.cli", "--version", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (res.returncode, res.stdout) == (0, f"smartvm {smartvm.__version__}\n")


def test_run_imports_only_its_own_command_module() -> None:
    res = _python(
        "import sys\n"
        "from smartvm.cli.main import build_app\n"
        "import typer\n"
        "app = build_app('run')\n"
        "assert 'run' in typer.main.get_group(app).commands\n"
        "assert not {'smartvm.cli.images', 'smartvm.cli.network'} & set(sys.modules)\n"
    )
    assert res.returncode == 0, res.stderr


# What `smartvm run` imports from a cached guest image and run snapshot to a finished command.
RUN_PATH_MODULES = (
    "smartvm.guests",
    "smartvm.images.guest_image",
    "smartvm.sandbox.run_snapshots",
    "smartvm.engines",
    "smartvm.qemu.engine",
    "smartvm.vm",
)
# Not needed there (issue 16: ~0.3 s of a warm run): the downloader and its HTTP client, the base image
# bundle cache, and rich (build spinners, tables).
NOT_ON_THE_RUN_PATH = ("httpx", "rich", "smartvm.images.download", "smartvm.images.base_images")


def test_run_imports_no_download_bundle_or_display_code() -> None:
    res = _python(
        "import importlib, sys\n"
        "from smartvm.cli.main import build_app\n"
        "build_app('run')\n"
        f"for name in {RUN_PATH_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "from smartvm.images.rootfs_build import rootfs_cache_key\n"
        "rootfs_cache_key('busybox')  # what a cache hit computes (hashes of the agent files)\n"
        f"found = sorted(m for m in sys.modules if m.split('.')[0] in {NOT_ON_THE_RUN_PATH!r} "
        f"or m in {NOT_ON_THE_RUN_PATH!r})\n"
        "assert not found, found\n"
    )
    assert res.returncode == 0, res.stderr


def test_every_command_is_routed_to_the_module_that_defines_it() -> None:
    everything = _commands(build_app())
    assert everything == set(COMMAND_MODULES)  # a new command must be added to COMMAND_MODULES
    for name in everything:
        assert name in _commands(build_app(name))


def test_an_unknown_command_gets_the_full_app_and_click_s_error() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "smartvm.cli", "bogus"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "No such command 'bogus'" in res.stderr
    assert _commands(build_app("bogus")) == set(COMMAND_MODULES)


@pytest.mark.parametrize(("command", "other"), [("run", "smartvm.cli.detached"), ("start", "smartvm.cli.vm")])
def test_run_and_the_detached_commands_do_not_import_each_other(command: str, other: str) -> None:
    res = _python(
        "import sys\n"
        "from smartvm.cli.main import build_app\n"
        f"build_app({command!r})\n"
        f"assert {other!r} not in sys.modules, {other!r}\n"
        "assert not [m for m in sys.modules if m.startswith('smartvm.images.')]\n"
    )
    assert res.returncode == 0, res.stderr


# A module global with a finaliser: only the interpreter's teardown frees it (and prints "teardown").
_TEARDOWN_PROBE = (
    "import atexit, sys\n"
    "class Probe:\n"
    "    def __del__(self):\n"
    "        sys.__stderr__.write('teardown\\n')\n"
    "probe = Probe()\n"
    "atexit.register(lambda: sys.__stderr__.write('atexit\\n'))\n"
    "sys.stdout.write('buffered;')\n"
)


def test_a_finished_command_exits_without_the_teardown_after_atexit_and_flushing() -> None:
    res = _python(
        _TEARDOWN_PROBE
        + "sys.argv = ['smartvm', 'run', '--help']\nfrom smartvm.cli.main import main\nmain()\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("buffered;") and "Usage: smartvm run" in res.stdout
    assert res.stderr == "atexit\n"


def test_a_failed_command_keeps_its_exit_code_and_message() -> None:
    res = _python(
        _TEARDOWN_PROBE + "sys.argv = ['smartvm', 'run']\nfrom smartvm.cli.main import main\nmain()\n"
    )
    assert res.returncode == 2
    assert "INVALID_ARGUMENT" in res.stderr and "give the command after --" in res.stderr
    assert res.stderr.endswith("atexit\n") and "teardown" not in res.stderr


@pytest.mark.parametrize(
    ("code", "returncode", "stderr"), [("None", 0, ""), ("3", 3, ""), ("'gave up'", 1, "gave up\n")]
)
def test_exit_now_exits_like_sys_exit(code: str, returncode: int, stderr: str) -> None:
    res = _python(f"from smartvm.cli.main import exit_now\nexit_now({code})\n")
    assert (res.returncode, res.stderr) == (returncode, stderr)


def test_exit_now_waits_for_a_running_thread_like_a_normal_exit() -> None:
    res = _python(
        "import threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread finished'))).start()\n"
        "from smartvm.cli.main import exit_now\n"
        "exit_now(0)\n"
    )
    assert (res.returncode, res.stdout) == (0, "thread finished\n")
