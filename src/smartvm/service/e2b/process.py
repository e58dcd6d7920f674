"""envd's ``process.Process`` service over smartvm's guest agent.

Every started command is a background process of the agent (``proc_run``): the Start stream only
watches it, so a client that goes away leaves it running (``commands.connect`` finds it again), while
the request's Connect-Timeout-Ms kills it, as envd does. PTYs are not supported: a request for one is
answered ``unimplemented``.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import AsyncIterator
from typing import Any, Literal

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof

from smartvm.agent import ExecEvent, ExecResult, ProcessInfo
from smartvm.service.e2b import binding as b
from smartvm.service.e2b.gen.process import process_pb as pb
from smartvm.service.e2b.gen.process.process_connect import Process
from smartvm.service.e2b.streams import deadline_of, keepalive_interval, timeout_s, user_of, with_keepalive

Event = pb.ProcessEvent
NO_PTY = "smartvm sandboxes have no PTY support; run the command without a pty"


def _start(pid: int) -> Event:
    start: Oneof[Literal["start"], Event.StartEvent] = Oneof("start", Event.StartEvent(pid=pid))
    return Event(event=start)


def _data(stream: str, data: bytes) -> Event:
    if stream == "stdout":
        out: Oneof[Literal["stdout"], bytes] = Oneof("stdout", data)
        event: Oneof[Literal["data"], Event.DataEvent] = Oneof("data", Event.DataEvent(output=out))
    else:
        err: Oneof[Literal["stderr"], bytes] = Oneof("stderr", data)
        event = Oneof("data", Event.DataEvent(output=err))
    return Event(event=event)


def _keepalive() -> Event:
    event: Oneof[Literal["keepalive"], Event.KeepAlive] = Oneof("keepalive", Event.KeepAlive())
    return Event(event=event)


def _end(result: ExecResult) -> Event:
    """envd's end event: Go's exit code (-1 when a signal ended the process), its ProcessState text,
    and as ``error`` the same text when the command failed (Go's cmd.Wait() error)."""
    if result.signal:
        try:
            name = _signal.Signals(result.signal).name
        except ValueError:
            name = f"signal {result.signal}"
        status = {"SIGKILL": "killed", "SIGTERM": "terminated", "SIGINT": "interrupt"}.get(name, name)
        end = Event.EndEvent(exit_code=-1, exited=False, status=f"signal: {status}")
    else:
        code = result.exit_code
        end = Event.EndEvent(exit_code=code, exited=True, status=f"exit status {code}")
    if not result.ok:
        end.error = end.status
    event: Oneof[Literal["end"], Event.EndEvent] = Oneof("end", end)
    return Event(event=event)


def _process_event(ev: ExecEvent) -> Event | None:
    if ev.kind == "started" and ev.pid is not None:
        return _start(ev.pid)
    if ev.kind in ("stdout", "stderr"):
        return _data(ev.kind, ev.data)
    if ev.kind == "exit" and ev.result is not None:
        return _end(ev.result)
    return None


def _info(proc: ProcessInfo) -> pb.ProcessInfo:
    """A process as List reports it: the config it was started with (kept as agent meta)."""
    meta = proc.meta if isinstance(proc.meta, dict) else {}
    config = meta.get("config")
    if isinstance(config, dict):
        cfg = pb.ProcessConfig(
            cmd=str(config.get("cmd", "")),
            args=[str(a) for a in config.get("args", [])],
            envs={str(k): str(v) for k, v in dict(config.get("envs") or {}).items()},
        )
        if config.get("cwd") is not None:
            cfg.cwd = str(config["cwd"])
    else:
        cfg = pb.ProcessConfig(cmd=proc.cmd[0] if proc.cmd else "", args=proc.cmd[1:])
    out = pb.ProcessInfo(config=cfg, pid=proc.pid)
    if isinstance(meta.get("tag"), str):
        out.tag = meta["tag"]
    return out


class ProcessService(Process):
    """Handlers of ``process.Process``; the sandbox comes from the request (binding.current()), and
    smartvm errors become Connect errors in the app's interceptor."""

    async def _running(self, selector: pb.ProcessSelector | None) -> ProcessInfo:
        """The running process a selector names (by pid or by tag); NOT_FOUND when there is none."""
        pid: int | None = None
        tag: str | None = None
        match selector.selector if selector is not None else None:
            case Oneof(field="pid", value=int(pid)):
                what = f"pid {pid}"
            case Oneof(field="tag", value=str(tag)):
                what = f"tag {tag!r}"
            case _:
                raise ConnectError(Code.INVALID_ARGUMENT, "select the process by pid or tag")

        def want(p: ProcessInfo) -> bool:
            if pid is not None:
                return p.pid == pid
            return isinstance(p.meta, dict) and p.meta.get("tag") == tag

        for proc in await b.current().target.processes.list():
            if proc.running and want(proc):
                return proc
        raise ConnectError(Code.NOT_FOUND, f"process with {what} not found (it may have exited)")

    async def list(self, request: pb.ListRequest, ctx: RequestContext[Any, Any], /) -> pb.ListResponse:
        procs = await b.current().target.processes.list()
        return pb.ListResponse(processes=[_info(p) for p in procs if p.running])

    async def start(
        self, request: pb.StartRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pb.StartResponse]:
        if request.has_field("pty"):
            raise ConnectError(Code.UNIMPLEMENTED, NO_PTY)
        binding = b.current()
        cfg = request.process or pb.ProcessConfig()
        if not cfg.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is empty; name the program to run")
        cwd = cfg.cwd if cfg.has_field("cwd") and cfg.cwd else None
        meta: dict[str, Any] = {
            "config": {"cmd": cfg.cmd, "args": list(cfg.args), "envs": dict(cfg.envs), "cwd": cwd}
        }
        if request.has_field("tag"):
            meta["tag"] = request.tag
        stdin = request.stdin if request.has_field("stdin") else True  # envd's default for old clients
        events = binding.target.processes.run(
            [cfg.cmd, *cfg.args],
            env={**binding.env, **cfg.envs},
            cwd=cwd,
            user=user_of(ctx),
            stdin=stdin,
            timeout=timeout_s(ctx),
            meta=meta,
        )
        started = False
        async for ev in with_keepalive(events, keepalive_interval(ctx), deadline_of(ctx)):
            if ev is None:
                yield pb.StartResponse(event=_keepalive())
                continue
            if ev.kind == "stderr" and not started:  # the program could not be started at all
                raise ConnectError(Code.INVALID_ARGUMENT, ev.data.decode(errors="replace").strip())
            started = started or ev.kind == "started"
            event = _process_event(ev)
            if event is not None:
                yield pb.StartResponse(event=event)

    async def connect(
        self, request: pb.ConnectRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pb.ConnectResponse]:
        proc = await self._running(request.process)
        yield pb.ConnectResponse(event=_start(proc.pid))
        events = b.current().target.processes.attach(proc.pid, replay=False)
        async for ev in with_keepalive(events, keepalive_interval(ctx), deadline_of(ctx)):
            event = _keepalive() if ev is None else _process_event(ev)
            if event is not None:
                yield pb.ConnectResponse(event=event)

    async def update(self, request: pb.UpdateRequest, ctx: RequestContext[Any, Any], /) -> pb.UpdateResponse:
        await self._running(request.process)
        if request.has_field("pty"):
            raise ConnectError(Code.UNIMPLEMENTED, NO_PTY)
        return pb.UpdateResponse()

    async def _write(self, selector: pb.ProcessSelector | None, data: pb.ProcessInput | None) -> None:
        proc = await self._running(selector)
        match data.input if data is not None else None:
            case Oneof(field="stdin", value=raw):
                pass
            case Oneof(field="pty"):
                raise ConnectError(Code.UNIMPLEMENTED, NO_PTY)
            case _:
                raise ConnectError(Code.INVALID_ARGUMENT, "input.stdin is missing")
        if not proc.stdin_open:
            raise ConnectError(
                Code.FAILED_PRECONDITION,
                f"process {proc.pid} has no open stdin; start it with stdin=True and do not close it",
            )
        await b.current().target.processes.send_stdin(proc.pid, raw)

    async def send_input(
        self, request: pb.SendInputRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.SendInputResponse:
        await self._write(request.process, request.input)
        return pb.SendInputResponse()

    async def stream_input(
        self, request: AsyncIterator[pb.StreamInputRequest], ctx: RequestContext[Any, Any], /
    ) -> pb.StreamInputResponse:
        selector: pb.ProcessSelector | None = None
        async for message in request:
            event = message.event.value if message.event is not None else None
            if isinstance(event, pb.StreamInputRequest.StartEvent):
                selector = event.process
                await self._running(selector)
            elif isinstance(event, pb.StreamInputRequest.DataEvent):
                if selector is None:
                    raise ConnectError(Code.INVALID_ARGUMENT, "send the start event (the process) first")
                await self._write(selector, event.input)
        return pb.StreamInputResponse()

    async def send_signal(
        self, request: pb.SendSignalRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.SendSignalResponse:
        if request.signal not in (pb.Signal.SIGKILL, pb.Signal.SIGTERM):
            raise ConnectError(Code.INVALID_ARGUMENT, "signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM")
        proc = await self._running(request.process)
        await b.current().target.processes.signal(proc.pid, int(request.signal))
        return pb.SendSignalResponse()

    async def close_stdin(
        self, request: pb.CloseStdinRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.CloseStdinResponse:
        proc = await self._running(request.process)
        await b.current().target.processes.close_stdin(proc.pid)
        return pb.CloseStdinResponse()
