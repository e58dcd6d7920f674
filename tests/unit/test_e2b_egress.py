"""E2B's egress rules become an EgressPolicy that lets through exactly what E2B would: allowed
destinations win over denied ones, a deny of everything is the default, domains are refused."""

from __future__ import annotations

import ipaddress

import pytest

from error_support import raises_code
from smartvm.errors import ErrorCode
from smartvm.host.nat import PRIVATE_RANGES, EgressPolicy
from smartvm.service.e2b.rest.egress import egress_policy


def _firewall_lets_through(policy: EgressPolicy, addr: str) -> bool:
    """The order of smartvm's egress chain (nat.egress_script): deny set, allow set, default."""
    ip = ipaddress.ip_address(addr)

    def within(cidrs: tuple[str, ...]) -> bool:
        return any(ip in ipaddress.ip_network(c) for c in cidrs)

    if within(policy.deny):
        return False
    if within(policy.allow):
        return True
    return policy.default == "allow" and not within(tuple(PRIVATE_RANGES))


def _e2b_lets_through(allow: list[str], deny: list[str], addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if any(ip in ipaddress.ip_network(a, strict=False) for a in allow):
        return True
    return not any(ip in ipaddress.ip_network(d, strict=False) for d in deny)


PROBES = ["1.1.1.1", "1.1.1.2", "8.8.8.8", "9.9.9.9", "93.184.216.34", "203.0.113.7", "203.0.113.99"]


@pytest.mark.parametrize(
    ("allow", "deny"),
    [
        ([], []),
        (["1.1.1.1"], []),
        ([], ["0.0.0.0/0"]),
        (["1.1.1.1", "8.8.8.0/24"], ["0.0.0.0/0"]),
        ([], ["8.8.8.8", "1.0.0.0/8"]),
        (["1.1.1.1"], ["1.0.0.0/8"]),  # an allowed address inside a denied block stays reachable
        (["203.0.113.0/28"], ["203.0.113.0/24", "9.9.9.9/32"]),
    ],
)
def test_the_policy_agrees_with_e2b_on_public_addresses(allow: list[str], deny: list[str]) -> None:
    policy = egress_policy(allow, deny, None)
    for addr in PROBES:
        assert _firewall_lets_through(policy, addr) == _e2b_lets_through(allow, deny, addr), addr


def test_shapes() -> None:
    assert egress_policy(None, None, None) == EgressPolicy.allow_all()
    assert egress_policy(None, None, False) == EgressPolicy.deny_all()
    assert egress_policy(["1.1.1.1"], ["0.0.0.0/0"], None) == EgressPolicy("deny", allow=("1.1.1.1/32",))
    cut = egress_policy(["10.1.2.3"], ["10.0.0.0/8"], None)
    assert cut.default == "allow" and cut.allow == ("10.1.2.3/32",)
    assert len(cut.deny) == 24 and "10.1.2.3/32" not in cut.deny  # the /8 minus one address
    # an allow list alone restricts nothing (E2B: leaving allowOut out allows all; it only wins over denies)
    assert egress_policy(["1.1.1.1"], None, None).default == "allow"


@pytest.mark.parametrize(
    ("allow", "deny", "match"),
    [
        (["example.com"], None, "domain"),
        (["*.example.com"], None, "domain"),
        (None, ["2001:db8::/32"], "IPv6"),
        (None, ["10.0.0.0/33"], "not an IPv4"),
    ],
)
def test_what_smartvm_cannot_filter_is_refused(
    allow: list[str] | None, deny: list[str] | None, match: str
) -> None:
    with raises_code(ErrorCode.INVALID_ARGUMENT, match=match):
        egress_policy(allow, deny, None)
