"""The guest agent's wire format: frames, limits, frame types and error codes (docs/agent-protocol.md).

Both sides import this one module: the host as :mod:`smartvm.agent.wire` (through
:mod:`smartvm.agent.protocol`), the guest agent as ``wire`` from the directory it is installed in
(``/opt/smartvm/wire.py``, next to ``agent.py``). So it is stdlib-only, imports nothing else from
smartvm, and stays small: it is loaded at every agent start, possibly under slow TCG emulation.
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSION = 1
AGENT_VSOCK_PORT = 52
VIRTIO_PORT_NAME = "smartvm.agent"

# ---------------------------------------------------------------------------------------------- framing
# Every frame: a fixed 20-byte header, then `header_len` bytes of UTF-8 JSON (an object, may be empty),
# then `payload_len` raw bytes. Big-endian: magic, version, type, flags, channel, header_len, payload_len.
MAGIC = b"SVMA"
HEADER = struct.Struct("!4sBBHIII")
HEADER_SIZE = HEADER.size
MAX_HEADER_JSON = 256 * 1024
MAX_PAYLOAD = 1024 * 1024
CHUNK_SIZE = 256 * 1024
# Lengths beyond this are not "a frame too large" but garbage: the decoder resynchronises on MAGIC.
INSANE_LENGTH = 64 * 1024 * 1024

HELLO = 1  # agent -> host: ready/identity (channel 0); host -> agent: "send me a hello"
REQUEST = 2  # host -> agent: open channel N with {"op": ...}
DATA = 3  # both ways: {"s": stream, "eof": bool} + payload bytes
EVENT = 4  # agent -> host: progress on channel N (e.g. {"event": "started", "pid": 12})
RESULT = 5  # agent -> host: final success; closes channel N
ERROR = 6  # agent -> host: final failure {"code", "message"}; closes channel N (channel 0: stream-level)
CANCEL = 7  # host -> agent: abandon channel N (kills an exec's process group)
FRAME_TYPES = {
    HELLO: "hello",
    REQUEST: "request",
    DATA: "data",
    EVENT: "event",
    RESULT: "result",
    ERROR: "error",
    CANCEL: "cancel",
}

# Error codes carried in ERROR frames (stable strings, see docs/agent-protocol.md).
E_BAD_MAGIC = "bad_magic"
E_BAD_FRAME = "bad_frame"
E_BAD_JSON = "bad_json"
E_TOO_LARGE = "frame_too_large"
E_VERSION = "unsupported_version"
E_BAD_REQUEST = "bad_request"
E_UNKNOWN_OP = "unknown_op"
E_CHANNEL = "bad_channel"
E_NO_PROCESS = "no_such_process"
E_FILE = "file_error"
E_NOT_FOUND = "not_found"
E_SPAWN = "spawn_failed"
E_CANCELLED = "cancelled"
E_INTERNAL = "internal"


class Frame(NamedTuple):
    """One decoded frame."""

    type: int
    channel: int
    header: dict[str, Any]
    payload: bytes


class FrameError(NamedTuple):
    """A framing problem the decoder found; the stream stays usable (skipped or resynchronised)."""

    code: str
    message: str
    channel: int


def encode_head(
    ftype: int,
    channel: int,
    header: dict[str, Any] | bytes | None,
    payload_len: int,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """The bytes of a frame that come before its payload (the payload can then be written as it is,
    without copying it into one buffer). ``header`` may be given already encoded (JSON bytes).
    Raises ValueError if the frame would exceed the limits."""
    if isinstance(header, bytes):
        hj = header if header != b"{}" else b""
    else:
        hj = json.dumps(header, separators=(",", ":")).encode() if header else b""
    if len(hj) > MAX_HEADER_JSON or payload_len > MAX_PAYLOAD:
        raise ValueError(f"frame too large: header {len(hj)} B, payload {payload_len} B")
    return HEADER.pack(MAGIC, version, ftype, 0, channel, len(hj), payload_len) + hj


def encode_frame(
    ftype: int,
    channel: int,
    header: dict[str, Any] | None = None,
    payload: bytes = b"",
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """Serialise one frame. Raises ValueError if it would exceed the frame limits."""
    return encode_head(ftype, channel, header, len(payload), version) + payload


class FrameDecoder:
    """Incremental decoder: feed bytes, get frames and framing errors.

    Oversized frames (within sane bounds) are skipped without buffering them; a bad magic or an
    absurd header makes the decoder scan forward for the next MAGIC (one error per garbage run).
    """

    def __init__(self, max_header: int = MAX_HEADER_JSON, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._skip = 0
        self._resyncing = False
        self._max_header = max_header
        self._max_payload = max_payload

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | FrameError]:
        buf = self._buf
        buf += data
        out: list[Frame | FrameError] = []
        pos, end = 0, len(buf)  # parse by offset; consumed bytes are dropped once, at the end
        try:
            while True:
                if self._skip:
                    n = min(self._skip, end - pos)
                    pos += n
                    self._skip -= n
                    if self._skip:
                        break
                avail = end - pos
                if avail < HEADER_SIZE and (not self._resyncing or avail < len(MAGIC)):
                    break
                if buf[pos : pos + 4] != MAGIC:
                    self._garbage(out, "bytes that do not start a frame (bad magic)", E_BAD_MAGIC)
                    idx = buf.find(MAGIC, pos + 1)
                    if idx < 0:
                        pos = max(pos, end - (len(MAGIC) - 1))
                        break
                    pos = idx
                    continue
                if avail < HEADER_SIZE:
                    break
                _, ver, ftype, _flags, channel, hlen, plen = HEADER.unpack_from(buf, pos)
                if hlen > INSANE_LENGTH or plen > INSANE_LENGTH or ftype == 0:
                    self._garbage(out, f"corrupt frame header (lengths {hlen}/{plen})", E_BAD_FRAME)
                    pos += 1
                    continue
                self._resyncing = False
                total = HEADER_SIZE + hlen + plen
                if ver != PROTOCOL_VERSION:
                    out.append(
                        FrameError(
                            E_VERSION,
                            f"protocol version {ver} is not supported (this side speaks {PROTOCOL_VERSION})",
                            channel,
                        )
                    )
                    self._skip = total
                    continue
                if hlen > self._max_header or plen > self._max_payload:
                    out.append(
                        FrameError(
                            E_TOO_LARGE,
                            f"frame of {hlen} B header + {plen} B payload exceeds "
                            f"the limits ({self._max_header} B / {self._max_payload} B)",
                            channel,
                        )
                    )
                    self._skip = total
                    continue
                if avail < total:
                    break
                start = pos + HEADER_SIZE
                with memoryview(buf) as view:  # one copy each, not a slice and then a copy
                    raw = bytes(view[start : start + hlen])
                    payload = bytes(view[start + hlen : pos + total])
                pos += total
                header: Any = {}
                if raw:
                    try:
                        header = json.loads(raw)
                    except ValueError as exc:
                        out.append(FrameError(E_BAD_JSON, f"frame header is not valid JSON: {exc}", channel))
                        continue
                if not isinstance(header, dict):
                    out.append(FrameError(E_BAD_JSON, "frame header must be a JSON object", channel))
                    continue
                out.append(Frame(ftype, channel, header, payload))
        finally:
            if pos >= len(buf):
                buf.clear()
            elif pos:
                del buf[:pos]
        return out

    def _garbage(self, out: list[Frame | FrameError], message: str, code: str) -> None:
        if not self._resyncing:
            out.append(FrameError(code, message + "; resynchronising", 0))
            self._resyncing = True


__all__ = [
    "AGENT_VERSION",
    "AGENT_VSOCK_PORT",
    "CANCEL",
    "CHUNK_SIZE",
    "DATA",
    "ERROR",
    "EVENT",
    "E_BAD_FRAME",
    "E_BAD_JSON",
    "E_BAD_MAGIC",
    "E_BAD_REQUEST",
    "E_CANCELLED",
    "E_CHANNEL",
    "E_FILE",
    "E_INTERNAL",
    "E_NOT_FOUND",
    "E_NO_PROCESS",
    "E_SPAWN",
    "E_TOO_LARGE",
    "E_UNKNOWN_OP",
    "E_VERSION",
    "FRAME_TYPES",
    "HEADER",
    "HEADER_SIZE",
    "HELLO",
    "INSANE_LENGTH",
    "MAGIC",
    "MAX_HEADER_JSON",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "REQUEST",
    "RESULT",
    "VIRTIO_PORT_NAME",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "encode_frame",
    "encode_head",
]
