"""The E2B-compatible envd face of ``smartvm serve``: the official E2B SDK's commands and files, served
by smartvm's own guest agent (no E2B code runs in the guest).

``EnvdApp(resolver)`` is the ASGI app; ``EnvdMiddleware(app, resolver)`` shares a port with the REST
API. The resolver maps a sandbox id to an :class:`EnvdBinding` (its access token and agent).
Connect messages are generated from the specs by ``scripts/gen-e2b-proto`` into ``gen/``.
"""

from smartvm.service.e2b.app import ENVD_VERSION, EnvdApp, EnvdMiddleware
from smartvm.service.e2b.binding import ENVD_PORT, EnvdBinding, EnvdTarget, Resolver

__all__ = ["ENVD_PORT", "ENVD_VERSION", "EnvdApp", "EnvdBinding", "EnvdMiddleware", "EnvdTarget", "Resolver"]
