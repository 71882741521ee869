"""One exception hierarchy for the network library."""

from __future__ import annotations


class NetworkError(Exception):
    """Base class of every error the network library raises."""


class InvalidSpec(NetworkError):
    """A value handed to the library is malformed (bad CIDR, MAC, name...)."""


class AddressExhausted(NetworkError):
    """No free address is left in a subnet's allocation pools."""


class AddressConflict(NetworkError):
    """An address is already used, or lies outside its subnet."""


class ApplyFailed(NetworkError):
    """A reconcile pass could not apply or verify the desired state; it was rolled back."""


class CommandFailed(NetworkError):
    """An external program (nft, dnsmasq) failed."""
