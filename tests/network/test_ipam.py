"""IPAM: pure allocation and validation rules."""

from __future__ import annotations

import pytest

from network.errors import AddressConflict, AddressExhausted, InvalidSpec
from network.ipam import allocate, claim_static, mac_for, overlapping, parse_subnet

pytestmark = pytest.mark.unit


def test_ipv4_allocation_skips_gateway_reserved_and_used_addresses() -> None:
    s = parse_subnet("10.20.0.0/24", reserved=["10.20.0.2"])
    assert s.gateway == "10.20.0.1"
    assert allocate(s, []) == "10.20.0.3"
    assert allocate(s, ["10.20.0.3", "10.20.0.4"]) == "10.20.0.5"


def test_ipv4_pool_exhaustion_raises() -> None:
    s = parse_subnet("10.20.0.0/29", pools=[("10.20.0.2", "10.20.0.3")])
    used = [allocate(s, [])]
    used.append(allocate(s, used))
    assert used == ["10.20.0.2", "10.20.0.3"]
    with pytest.raises(AddressExhausted):
        allocate(s, used)


def test_ipv4_never_hands_out_the_broadcast_address() -> None:
    s = parse_subnet("10.0.0.0/30")
    assert allocate(s, []) == "10.0.0.2"
    with pytest.raises(AddressExhausted):
        allocate(s, ["10.0.0.2"])


def test_ipv6_subnet_gets_gateway_and_addresses() -> None:
    s = parse_subnet("fd00:20::/64")
    assert s.gateway == "fd00:20::1"
    assert allocate(s, ["fd00:20::2"]) == "fd00:20::3"


def test_invalid_cidr_and_outside_addresses_are_rejected() -> None:
    with pytest.raises(InvalidSpec):
        parse_subnet("10.20.0.0/33")
    with pytest.raises(InvalidSpec):
        parse_subnet("10.20.0.1/24")  # host bits set
    with pytest.raises(AddressConflict):
        parse_subnet("10.20.0.0/24", gateway="10.21.0.1")
    s = parse_subnet("10.20.0.0/24")
    with pytest.raises(AddressConflict):
        claim_static(s, "10.99.0.5", [])
    with pytest.raises(AddressConflict):
        claim_static(s, "10.20.0.1", [])  # gateway
    with pytest.raises(AddressConflict):
        claim_static(s, "10.20.0.9", ["10.20.0.9"])
    assert claim_static(s, "10.20.0.9", []) == "10.20.0.9"


def test_overlapping_subnets_are_reported() -> None:
    assert overlapping(["10.0.0.0/24", "10.0.0.128/25", "10.1.0.0/24", "fd00::/64"]) == [
        ("10.0.0.0/24", "10.0.0.128/25")
    ]


def test_mac_for_is_unicast_locally_administered_and_distinct() -> None:
    macs = {mac_for(i) for i in range(1000)}
    assert len(macs) == 1000
    first = int(next(iter(macs)).split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
