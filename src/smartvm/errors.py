"""Every failure a user can hit, each with one stable code.

Callers match on ``err.code`` (a :class:`ErrorCode`, which is also a plain ``str``);
messages are for humans and say what to do next. A bad value (``INVALID_CONFIG``,
``INVALID_ARGUMENT``) is also a ``ValueError``, so ``except ValueError`` works for it too.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The stable error codes. Add new ones here, never reuse or rename one."""

    # configuration and input
    INVALID_CONFIG = "INVALID_CONFIG"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNSAFE_PATH = "UNSAFE_PATH"
    UNSAFE_DIRECTORY = "UNSAFE_DIRECTORY"
    # lifecycle
    INVALID_STATE = "INVALID_STATE"
    NO_CLIENT = "NO_CLIENT"
    VM_NOT_FOUND = "VM_NOT_FOUND"
    DUPLICATE_VM_ID = "DUPLICATE_VM_ID"
    BOOT_FAILED = "BOOT_FAILED"
    VM_EXITED = "VM_EXITED"
    STAGING_FAILED = "STAGING_FAILED"
    SNAPSHOT_FAILED = "SNAPSHOT_FAILED"
    SNAPSHOT_MISMATCH = "SNAPSHOT_MISMATCH"
    SNAPSHOT_INVALID = "SNAPSHOT_INVALID"
    # engines
    ENGINE_UNAVAILABLE = "ENGINE_UNAVAILABLE"
    UNSUPPORTED_BY_ENGINE = "UNSUPPORTED_BY_ENGINE"
    BINARY_NOT_FOUND = "BINARY_NOT_FOUND"
    FIRECRACKER_API_ERROR = "FIRECRACKER_API_ERROR"
    FIRECRACKER_EXITED = "FIRECRACKER_EXITED"
    SOCKET_TIMEOUT = "SOCKET_TIMEOUT"
    JAILER_FAILED = "JAILER_FAILED"
    QEMU_EXITED = "QEMU_EXITED"
    QMP_ERROR = "QMP_ERROR"
    # images
    VERSION_FETCH_FAILED = "VERSION_FETCH_FAILED"
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    ROOTFS_CREATE_FAILED = "ROOTFS_CREATE_FAILED"
    ROOTFS_CLONE_FAILED = "ROOTFS_CLONE_FAILED"
    INVALID_BASE_IMAGE_MANIFEST = "INVALID_BASE_IMAGE_MANIFEST"
    BASE_IMAGE_MANIFEST_FAILED = "BASE_IMAGE_MANIFEST_FAILED"
    INVALID_BASE_IMAGE_CACHE_LIMIT = "INVALID_BASE_IMAGE_CACHE_LIMIT"
    BASE_IMAGE_PREPARE_FAILED = "BASE_IMAGE_PREPARE_FAILED"
    BUILD_FAILED = "BUILD_FAILED"
    BUILD_TOOL_MISSING = "BUILD_TOOL_MISSING"
    BASE_IMAGE_RESOLVE_FAILED = "BASE_IMAGE_RESOLVE_FAILED"
    # guest agent
    AGENT_TIMEOUT = "AGENT_TIMEOUT"
    AGENT_UNAVAILABLE = "AGENT_UNAVAILABLE"
    AGENT_PROTOCOL_ERROR = "AGENT_PROTOCOL_ERROR"
    AGENT_ERROR = "AGENT_ERROR"
    EXEC_TIMEOUT = "EXEC_TIMEOUT"
    GUEST_FILE_ERROR = "GUEST_FILE_ERROR"
    GUEST_OUTPUT_TOO_LARGE = "GUEST_OUTPUT_TOO_LARGE"
    HOST_FILE_ERROR = "HOST_FILE_ERROR"
    # host networking
    NETWORK_SETUP_FAILED = "NETWORK_SETUP_FAILED"
    ADDRESS_EXHAUSTED = "ADDRESS_EXHAUSTED"
    NETWORK_PERMISSION_DENIED = "NETWORK_PERMISSION_DENIED"
    # service (`smartvm serve`)
    UNAUTHORIZED = "UNAUTHORIZED"
    API_KEY_NOT_FOUND = "API_KEY_NOT_FOUND"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    VALIDATION_FAILED = "VALIDATION_FAILED"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    ROUTE_NOT_FOUND = "ROUTE_NOT_FOUND"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # sandboxes
    DATA_DIR_IN_USE = "DATA_DIR_IN_USE"
    STATE_STORE_FAILED = "STATE_STORE_FAILED"
    SANDBOX_NOT_FOUND = "SANDBOX_NOT_FOUND"
    TEMPLATE_NOT_FOUND = "TEMPLATE_NOT_FOUND"
    INVALID_SANDBOX_TRANSITION = "INVALID_SANDBOX_TRANSITION"
    COW_UNAVAILABLE = "COW_UNAVAILABLE"
    COW_FAILED = "COW_FAILED"
    LOOP_DEVICE_FAILED = "LOOP_DEVICE_FAILED"
    SNAPSHOT_NOT_FOUND = "SNAPSHOT_NOT_FOUND"
    SANDBOX_NOT_RUNNING = "SANDBOX_NOT_RUNNING"
    SANDBOX_ALREADY_PAUSED = "SANDBOX_ALREADY_PAUSED"
    SANDBOX_NOT_PAUSED = "SANDBOX_NOT_PAUSED"
    SANDBOX_LIMIT_REACHED = "SANDBOX_LIMIT_REACHED"
    HOST_CAPACITY = "HOST_CAPACITY"
    TEMPLATE_BUILD_FAILED = "TEMPLATE_BUILD_FAILED"
    SNAPSHOT_IN_USE = "SNAPSHOT_IN_USE"
    SNAPSHOT_EXISTS = "SNAPSHOT_EXISTS"
    SANDBOX_FAILED = "SANDBOX_FAILED"


class SmartVMError(Exception):
    """The one exception type smartvm raises on purpose.

    ``code`` is stable and machine-readable; ``message`` tells the user what went wrong and
    what to do about it. ``SmartVMError(code, ...)`` with a code of :data:`VALUE_CODES` is an
    :class:`InvalidValueError`, which is also a ``ValueError``.
    """

    def __new__(cls, code: ErrorCode | str, message: str, *args: object, **kwargs: object) -> SmartVMError:
        if cls is SmartVMError and ErrorCode(code) in VALUE_CODES:
            cls = InvalidValueError
        return super().__new__(cls, code, message, *args, **kwargs)

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        self.code = ErrorCode(code)
        self.message = message
        super().__init__(f"[{self.code}] {message}")

    def __reduce__(self) -> tuple[type[SmartVMError], tuple[str, str]]:
        return (type(self), (self.code.value, self.message))


class InvalidValueError(SmartVMError, ValueError):
    """A SmartVMError for a bad value (a code of :data:`VALUE_CODES`); also a ``ValueError``."""


#: the codes of bad values: their SmartVMError is also a ValueError
VALUE_CODES = frozenset({ErrorCode.INVALID_CONFIG, ErrorCode.INVALID_ARGUMENT})


class AgentBusyError(SmartVMError):
    """AGENT_UNAVAILABLE because every channel to the guest agent is held by other clients: unlike a
    guest that is still booting, waiting for the agent does not help, so callers fail at once."""


def all_codes() -> list[str]:
    """Every error code, for docs and for ``smartvm errors``."""
    return [code.value for code in ErrorCode]
