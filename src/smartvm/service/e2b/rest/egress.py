"""E2B's egress rules (``allowOut``, ``denyOut``, ``allow_internet_access``) as an EgressPolicy.

In E2B an allowed destination wins over a denied one (``denyOut: ["0.0.0.0/0"]`` with
``allowOut: ["1.1.1.1"]`` reaches only 1.1.1.1), and leaving ``allowOut`` out allows everything.
smartvm's firewall drops its deny set before it looks at the allow set, so denied ranges are cut
around the allowed ones here, and a deny of all traffic becomes the policy's default. Domain names
would need a resolving proxy, which smartvm does not run: they are refused with a clear message.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from ipaddress import IPv4Network

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.nat import EgressPolicy


def _network(entry: str, field: str) -> IPv4Network:
    try:
        net = ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"{field} entry {entry!r} is not an IPv4 address or CIDR block; smartvm does not filter by "
            "domain name: list the addresses instead",
        ) from None
    if not isinstance(net, IPv4Network):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"{field} entry {entry!r} is IPv6: sandboxes have IPv4 egress only (IPv6 is always blocked)",
        )
    return net


def _cut(denied: IPv4Network, allowed: Sequence[IPv4Network]) -> list[IPv4Network]:
    """``denied`` minus every allowed range, as CIDR blocks."""
    pieces = [denied]
    for hole in allowed:
        rest: list[IPv4Network] = []
        for piece in pieces:
            if not piece.overlaps(hole):
                rest.append(piece)
            elif piece.subnet_of(hole):
                continue
            else:
                rest.extend(piece.address_exclude(hole))
        pieces = rest
    return pieces


def egress_policy(
    allow_out: Sequence[str] | None, deny_out: Sequence[str] | None, allow_internet_access: bool | None
) -> EgressPolicy:
    """The policy that lets through exactly what E2B's rules let through."""
    allowed = list(ipaddress.collapse_addresses(_network(e, "allowOut") for e in allow_out or ()))
    denied = [_network(e, "denyOut") for e in deny_out or ()]
    deny_all = allow_internet_access is False or any(d.prefixlen == 0 for d in denied)
    cut = [p for d in denied if d.prefixlen > 0 for p in _cut(d, allowed)]
    return EgressPolicy(
        "deny" if deny_all else "allow",
        allow=tuple(str(a) for a in allowed),
        deny=tuple(str(d) for d in ipaddress.collapse_addresses(cut)),
    )


def e2b_rules(policy: EgressPolicy) -> dict[str, list[str]]:
    """The policy as E2B's ``allowOut``/``denyOut`` (what ``get_info().network`` shows)."""
    deny = [*policy.deny, *(["0.0.0.0/0"] if policy.default == "deny" else [])]
    return {"allowOut": list(policy.allow), "denyOut": deny}
