"""A blocking client of a running service's ``/v1`` API, for ``smartvm sandbox`` and scripts.

httpx for the REST calls (uploads and downloads streamed), the ``websockets`` client for exec, whose
output arrives as the command writes it. An error answer of the service becomes the
:class:`SmartVMError` it names (same code, same message); a service that cannot be reached is
SERVICE_UNAVAILABLE saying where the client looked. Bodies come back as the API's JSON (dicts).
"""

from __future__ import annotations

import builtins
import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import httpx

from smartvm.errors import ErrorCode, SmartVMError

DEFAULT_URL = "http://127.0.0.1:49999"
URL_ENV = "SMARTVM_URL"
KEY_ENV = "SMARTVM_API_KEY"
KEY_HEADER = "X-API-Key"
CHUNK = 256 << 10
# a create may build the base template first; a pause writes guest memory to disk
_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

Json = dict[str, Any]


def error_from(body: object) -> SmartVMError | None:
    """The SmartVMError of a JSON error body ``{"code": ..., "message": ...}``; None if it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("code"), str):
        return None
    code, message = body["code"], str(body.get("message", ""))
    if code not in ErrorCode.__members__:  # a newer service's code
        return SmartVMError(ErrorCode.INTERNAL_ERROR, f"{code}: {message}")
    return SmartVMError(code, message)


def error_of(res: httpx.Response) -> SmartVMError:
    """The service's error answer ``res`` as a SmartVMError (a non-JSON answer keeps its status)."""
    try:
        found = error_from(res.json())
    except ValueError:
        found = None
    if found is not None:
        return found
    text = res.text[:200].strip() or res.reason_phrase
    return SmartVMError(ErrorCode.INTERNAL_ERROR, f"HTTP {res.status_code} from the service: {text}")


def checked(res: httpx.Response) -> httpx.Response:
    """``res`` when it succeeded, else its error raised."""
    if res.status_code >= 400:
        raise error_of(res)
    return res


def unreachable(url: str, exc: BaseException) -> SmartVMError:
    return SmartVMError(
        ErrorCode.SERVICE_UNAVAILABLE,
        f"cannot reach the service at {url} ({type(exc).__name__}: {exc}): start it with "
        f"`smartvm serve`, or point --url or {URL_ENV} at it",
    )


def check_url(url: str) -> str:
    """``url`` without a trailing slash; INVALID_ARGUMENT unless it is http(s)://host[:port]."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"service URL {url!r}: use http://HOST:PORT (e.g. {DEFAULT_URL})"
        )
    return url.rstrip("/")


class ServiceClient:
    """One service at ``url`` with the API key ``key``; use it as a context manager."""

    def __init__(self, url: str, key: str | None) -> None:
        if not key:
            raise SmartVMError(
                ErrorCode.UNAUTHORIZED,
                f"no API key: set {KEY_ENV} to a key from `smartvm keys create` on the service's host",
            )
        self.url = check_url(url)
        self.key = key
        self.http = httpx.Client(base_url=self.url, headers={KEY_HEADER: key}, timeout=_TIMEOUT)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return checked(self.http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # --- sandboxes -------------------------------------------------------------------------------
    def create(
        self,
        template: str = "base",
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Json:
        body: Json = {"template": template, "metadata": dict(metadata or {})}
        if timeout is not None:
            body["timeout"] = timeout
        created: Json = self._json("POST", "/v1/sandboxes", json=body)
        return created

    def list(self, *, states: Sequence[str] = (), metadata: Mapping[str, str] | None = None) -> list[Json]:
        params = [("state", s) for s in states] + [
            ("metadata", f"{k}={v}") for k, v in (metadata or {}).items()
        ]
        found: list[Json] = self._json("GET", "/v1/sandboxes", params=params)
        return found

    def get(self, sandbox_id: str) -> Json:
        got: Json = self._json("GET", f"/v1/sandboxes/{sandbox_id}")
        return got

    def pause(self, sandbox_id: str) -> Json:
        paused: Json = self._json("POST", f"/v1/sandboxes/{sandbox_id}/pause")
        return paused

    def resume(self, sandbox_id: str, *, timeout: float | None = None) -> Json:
        body = None if timeout is None else {"timeout": timeout}
        resumed: Json = self._json("POST", f"/v1/sandboxes/{sandbox_id}/resume", json=body)
        return resumed

    def kill(self, sandbox_id: str) -> None:
        self._request("DELETE", f"/v1/sandboxes/{sandbox_id}")

    def fork(self, sandbox_id: str, count: int = 1, *, timeout: float | None = None) -> builtins.list[Json]:
        """One item per fork: ``{"sandbox": ...}`` or ``{"error": {"code", "message"}}``."""
        body: Json = {"count": count} if timeout is None else {"count": count, "timeout": timeout}
        forks: builtins.list[Json] = self._json("POST", f"/v1/sandboxes/{sandbox_id}/fork", json=body)
        return forks

    def set_egress(
        self, sandbox_id: str, default: str, allow: builtins.list[str], deny: builtins.list[str]
    ) -> Json:
        body = {"default": default, "allow": allow, "deny": deny}
        updated: Json = self._json("PUT", f"/v1/sandboxes/{sandbox_id}/egress", json=body)
        return updated

    def snapshot(self, sandbox_id: str, name: str) -> Json:
        snap: Json = self._json("POST", f"/v1/sandboxes/{sandbox_id}/snapshots", json={"name": name})
        return snap

    # --- files -----------------------------------------------------------------------------------
    def upload(self, sandbox_id: str, path: str, chunks: Iterable[bytes]) -> Json:
        """Stream ``chunks`` into the guest file ``path`` (replaced atomically); its file info."""
        info: Json = self._json(
            "PUT", f"/v1/sandboxes/{sandbox_id}/files/content", params={"path": path}, content=chunks
        )
        return info

    @contextmanager
    def download(self, sandbox_id: str, path: str) -> Iterator[Iterator[bytes]]:
        """The guest file ``path`` in chunks as they arrive (a missing file raises before any)."""
        url = f"/v1/sandboxes/{sandbox_id}/files/content"
        try:
            with self.http.stream("GET", url, params={"path": path}) as res:
                if res.status_code >= 400:
                    res.read()
                    raise error_of(res)
                yield res.iter_bytes(CHUNK)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None

    # --- exec ------------------------------------------------------------------------------------
    def exec_stream(
        self,
        sandbox_id: str,
        cmd: str | Sequence[str],
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], None],
        on_stderr: Callable[[str], None],
    ) -> Json:
        """Run ``cmd`` over the exec WebSocket, handing output to the callbacks as it comes; the
        ``exit`` event (``exit_code``, ``duration_s``, ...). Leaving early (an exception, Ctrl-C)
        closes the socket, and the service kills the command."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, WebSocketException
        from websockets.sync.client import connect

        ws_url = "ws" + self.url[len("http") :] + f"/v1/sandboxes/{sandbox_id}/exec/stream"
        request = {"cmd": cmd if isinstance(cmd, str) else list(cmd), "timeout": timeout}
        try:
            with connect(ws_url, additional_headers={KEY_HEADER: self.key}, open_timeout=10) as ws:
                with contextlib.suppress(ConnectionClosed):  # a refusal (bad key...) may come first:
                    ws.send(json.dumps(request))  # its error event is read below all the same
                for message in ws:
                    event = json.loads(message)
                    kind = event.get("type")
                    if kind == "stdout":
                        on_stdout(event["data"])
                    elif kind == "stderr":
                        on_stderr(event["data"])
                    elif kind == "exit":
                        exited: Json = event
                        return exited
                    elif kind == "error":
                        raise error_from(event) or SmartVMError(ErrorCode.INTERNAL_ERROR, str(event))
        except (OSError, InvalidHandshake) as exc:
            raise unreachable(self.url, exc) from None
        except WebSocketException as exc:
            raise SmartVMError(
                ErrorCode.SERVICE_UNAVAILABLE, f"the exec stream broke off ({exc}): the command may have run"
            ) from None
        raise SmartVMError(
            ErrorCode.SERVICE_UNAVAILABLE, "the service closed the exec stream before the command exited"
        )
