"""The E2B-compatible REST face of ``smartvm serve``: the sandbox routes of E2B's control plane
(``/v2/sandboxes``, ``/sandboxes/{id}``, connect, pause, timeout, metrics, snapshots, template
aliases) over the service's backend, so that the official E2B SDK creates and manages sandboxes
here unchanged. :func:`service_app` mounts it, with the envd face, into the service's app.
"""

from smartvm.service.e2b.rest.app import ServiceApp, e2b_routers, service_app

__all__ = ["ServiceApp", "e2b_routers", "service_app"]
