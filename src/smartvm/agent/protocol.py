"""Host-side view of the guest agent protocol (see docs/agent-protocol.md).

The wire format itself is :mod:`smartvm.agent.wire`, the one small stdlib-only module the guest agent
imports too; this module re-exports it and adds what only the host needs: the mapping from the agent's
error strings to stable :class:`~smartvm.errors.ErrorCode` values.
"""

from __future__ import annotations

from typing import Any

from smartvm.agent.wire import (
    AGENT_VERSION,
    AGENT_VSOCK_PORT,
    CANCEL,
    CHUNK_SIZE,
    DATA,
    E_BAD_FRAME,
    E_BAD_JSON,
    E_BAD_MAGIC,
    E_BAD_REQUEST,
    E_CANCELLED,
    E_CHANNEL,
    E_FILE,
    E_INTERNAL,
    E_NO_PROCESS,
    E_NOT_FOUND,
    E_SPAWN,
    E_TOO_LARGE,
    E_UNKNOWN_OP,
    E_VERSION,
    ERROR,
    EVENT,
    FRAME_TYPES,
    HEADER,
    HEADER_SIZE,
    HELLO,
    MAGIC,
    MAX_HEADER_JSON,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    REQUEST,
    RESULT,
    VIRTIO_PORT_NAME,
    Frame,
    FrameDecoder,
    FrameError,
    encode_frame,
)
from smartvm.errors import ErrorCode, SmartVMError

__all__ = [
    "AGENT_VERSION",
    "AGENT_VSOCK_PORT",
    "CANCEL",
    "CHUNK_SIZE",
    "DATA",
    "ERROR",
    "EVENT",
    "FRAME_TYPES",
    "HEADER",
    "HEADER_SIZE",
    "HELLO",
    "MAGIC",
    "MAX_HEADER_JSON",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "REQUEST",
    "RESULT",
    "VIRTIO_PORT_NAME",
    "AgentOpError",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "encode_frame",
    "error_from_frame",
]


class AgentOpError(SmartVMError):
    """An ERROR frame from the agent; ``agent_code`` is the agent's own error string (e.g. ``not_found``)."""

    def __init__(
        self, code: ErrorCode | str, message: str, agent_code: str = E_INTERNAL, errno: str | None = None
    ) -> None:
        super().__init__(code, message)
        self.agent_code = agent_code
        self.errno = errno  # the errno name of a failed file operation (``ENOENT``, ``EEXIST``...)


# Agent error strings -> stable host error codes.
_CODE_MAP: dict[str, ErrorCode] = {
    E_BAD_MAGIC: ErrorCode.AGENT_PROTOCOL_ERROR,
    E_BAD_FRAME: ErrorCode.AGENT_PROTOCOL_ERROR,
    E_BAD_JSON: ErrorCode.AGENT_PROTOCOL_ERROR,
    E_TOO_LARGE: ErrorCode.AGENT_PROTOCOL_ERROR,
    E_VERSION: ErrorCode.AGENT_PROTOCOL_ERROR,
    E_UNKNOWN_OP: ErrorCode.AGENT_PROTOCOL_ERROR,
    E_CHANNEL: ErrorCode.AGENT_PROTOCOL_ERROR,
    E_BAD_REQUEST: ErrorCode.INVALID_ARGUMENT,
    E_FILE: ErrorCode.GUEST_FILE_ERROR,
    E_NOT_FOUND: ErrorCode.GUEST_FILE_ERROR,
    E_NO_PROCESS: ErrorCode.AGENT_ERROR,
    E_SPAWN: ErrorCode.AGENT_ERROR,
    E_CANCELLED: ErrorCode.AGENT_ERROR,
    E_INTERNAL: ErrorCode.AGENT_ERROR,
}


def error_from_frame(op: str, header: dict[str, Any]) -> AgentOpError:
    """Build the error for an ERROR frame answering `op`."""
    agent_code = str(header.get("code", E_INTERNAL))
    code = _CODE_MAP.get(agent_code, ErrorCode.AGENT_ERROR)
    message = str(header.get("message", "no message"))
    errno = header.get("errno")
    return AgentOpError(
        code,
        f"guest agent: {op} failed: {message} [{agent_code}]",
        agent_code,
        errno if isinstance(errno, str) else None,
    )
