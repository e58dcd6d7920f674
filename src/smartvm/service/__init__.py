"""``smartvm serve``: the sandbox service (API keys, the ``/v1`` REST API, ``/metrics``, the page at
``GET /test``). FastAPI and uvicorn are imported only by the modules that serve, never by this one."""

from pathlib import Path

# Where `smartvm serve` and `smartvm keys` keep state by default: SmartVMOptions' data dir, so that
# sandboxes, VM records and API keys of one user live together.
DEFAULT_DATA_DIR = Path("/tmp/.smartvm")
