"""The guest agent (guest.py, runs inside the VM) and its host client (client.py)."""

from smartvm.agent.client import (
    AgentClient,
    AgentInfo,
    ExecEvent,
    ExecResult,
    ExecTimeoutError,
    FileInfo,
    Files,
    FsEvent,
    GuestUser,
    Health,
    OpenStream,
    Processes,
    ProcessInfo,
    Reseed,
    TimeSync,
)
from smartvm.agent.protocol import AGENT_VSOCK_PORT, PROTOCOL_VERSION, VIRTIO_PORT_NAME, AgentOpError

#: where the image builder installs guest.py inside the root filesystem
GUEST_AGENT_PATH = "/opt/smartvm/agent.py"

__all__ = [
    "AGENT_VSOCK_PORT",
    "GUEST_AGENT_PATH",
    "PROTOCOL_VERSION",
    "VIRTIO_PORT_NAME",
    "AgentClient",
    "AgentInfo",
    "AgentOpError",
    "ExecEvent",
    "ExecResult",
    "ExecTimeoutError",
    "FileInfo",
    "Files",
    "FsEvent",
    "GuestUser",
    "Health",
    "OpenStream",
    "ProcessInfo",
    "Processes",
    "Reseed",
    "TimeSync",
]
