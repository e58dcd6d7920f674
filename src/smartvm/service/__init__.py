"""``smartvm serve``: the sandbox service (API keys, the ``/v1`` REST API, ``/metrics``, the page at
``GET /test``). FastAPI and uvicorn are imported only by the modules that serve, never by this one."""

from pathlib import Path

# Where `smartvm serve` and `smartvm keys` keep state by default: SandboxSettings' data dir, so that
# the service and `SandboxManager()` see the same sandboxes, with the API keys beside them.
DEFAULT_DATA_DIR = Path("/var/lib/smartvm")
