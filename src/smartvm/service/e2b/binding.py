"""Which sandbox a request is for, whether it may reach it, and as which guest user it acts.

The envd face serves every sandbox on one port: a request names its sandbox by the ``E2b-Sandbox-Id``
header (what the SDK sends when ``E2B_SANDBOX_URL`` is set), or by a ``Host`` of the form
``<port>-<sandbox id>.<domain>`` (the SDK's default URLs). A resolver supplied by the service turns the
id into an :class:`EnvdBinding`; this module never knows where sandboxes come from.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import hmac
import inspect
import re
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from smartvm.agent import Files, GuestUser, Processes
from smartvm.errors import ErrorCode, SmartVMError

ENVD_PORT = 49983
SANDBOX_ID_HEADER = "e2b-sandbox-id"
ACCESS_TOKEN_HEADER = "x-access-token"
_HOST_RE = re.compile(r"^(\d+)-([A-Za-z0-9_-]+)\.")


class EnvdTarget(Protocol):
    """What the envd face needs of a sandbox: smartvm's guest agent (a running ``MicroVM`` has it)."""

    @property
    def files(self) -> Files: ...

    @property
    def processes(self) -> Processes: ...


@dataclass(frozen=True)
class EnvdBinding:
    """A resolved sandbox: the token its requests must carry (None: no token needed), its agent, the
    user commands and file operations run as when the request names none (None: the agent's own,
    root), and environment variables every command gets (the sandbox's ``envs``)."""

    access_token: str | None
    target: EnvdTarget
    default_user: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)


#: sandbox id -> its binding (or a ``(token, target)`` pair), or None when there is no such sandbox
ResolveResult = EnvdBinding | tuple[str | None, EnvdTarget] | None
Resolver = Callable[[str], ResolveResult | Awaitable[ResolveResult]]


class UserHomes:
    """Home directories of guest users, asked once per sandbox and user (relative paths start there)."""

    def __init__(self) -> None:
        self._homes: weakref.WeakKeyDictionary[object, dict[str | None, GuestUser]] = (
            weakref.WeakKeyDictionary()
        )

    async def home(self, target: EnvdTarget, user: str | None) -> str:
        try:
            known = self._homes.setdefault(target, {})
        except TypeError:  # a target that cannot be weakly referenced: ask every time
            known = {}
        if user not in known:
            known[user] = await target.processes.user(user)
        return known[user].home

    async def absolute(self, target: EnvdTarget, user: str | None, path: str) -> str:
        """`path` as envd reads it: absolute, or relative to the user's home (``~`` too)."""
        if not path:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "path is empty; give a file path")
        if path.startswith("/"):
            return path
        home = await self.home(target, user)
        if path == "~":
            return home
        rest = path[2:] if path.startswith("~/") else path
        return home.rstrip("/") + "/" + rest


class ClientGone:
    """Set once a request's client has gone away; subscribers are called then (at once if it is
    already set). A callback, not an event, so that a stream needs no task to watch for it."""

    def __init__(self) -> None:
        self._set = False
        self._subscribers: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        subscribers, self._subscribers = self._subscribers, []
        for fn in subscribers:
            fn()

    def subscribe(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn` when the client goes away; returns the unsubscribe call."""
        if self._set:
            fn()
            return lambda: None
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(fn)

        return unsubscribe


@dataclass(frozen=True)
class Request:
    """The request being served: its sandbox, the app's cache of user home directories, and whether
    its client has gone away."""

    sandbox_id: str
    binding: EnvdBinding
    homes: UserHomes
    gone: ClientGone = field(default_factory=ClientGone)


_current: contextvars.ContextVar[Request] = contextvars.ContextVar("smartvm_envd_request")


def current() -> EnvdBinding:
    """The binding of the request being served (set by the router before any handler runs)."""
    return _current.get().binding


def current_request() -> Request:
    return _current.get()


async def absolute(user: str | None, path: str) -> str:
    """`path` of the current request as envd reads it (relative paths start in `user`'s home)."""
    request = _current.get()
    return await request.homes.absolute(request.binding.target, user, path)


def bind(request: Request) -> contextvars.Token[Request]:
    return _current.set(request)


def unbind(token: contextvars.Token[Request]) -> None:
    _current.reset(token)


def sandbox_id_of(headers: Mapping[str, str]) -> str | None:
    """The sandbox a request is for: the E2b-Sandbox-Id header, else a ``<port>-<id>.`` Host."""
    sandbox_id = headers.get(SANDBOX_ID_HEADER)
    if sandbox_id:
        return sandbox_id
    match = _HOST_RE.match(headers.get("host", ""))
    return match.group(2) if match else None


async def resolve(resolver: Resolver, sandbox_id: str) -> EnvdBinding | None:
    result = resolver(sandbox_id)
    if inspect.isawaitable(result):
        result = await result
    if result is None or isinstance(result, EnvdBinding):
        return result
    token, target = result
    return EnvdBinding(token, target)


def token_ok(binding: EnvdBinding, given: str | None) -> bool:
    """Constant-time check of the request's X-Access-Token against the sandbox's."""
    if binding.access_token is None:
        return True
    return given is not None and hmac.compare_digest(given.encode(), binding.access_token.encode())


def request_user(headers: Mapping[str, str], binding: EnvdBinding) -> str | None:
    """The user the SDK asks for (``Authorization: Basic base64("user:")``), else the sandbox default."""
    auth = headers.get("authorization", "")
    if auth[:6].lower() == "basic ":
        try:
            user = base64.b64decode(auth[6:].strip(), validate=True).decode().split(":", 1)[0]
        except (binascii.Error, UnicodeDecodeError):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, "the Authorization header is not Basic base64('user:')"
            ) from None
        if user:
            return user
    return binding.default_user
