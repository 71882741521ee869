"""The compute library's exception hierarchy: callers map these to 4xx answers."""

from __future__ import annotations


class ComputeError(Exception):
    """Base of every error the compute library raises on purpose."""


class InvalidSpec(ComputeError):
    """A VM or container spec is malformed (bad name, MAC, URI, sizes...)."""


class InvalidCloudInit(InvalidSpec):
    """A cloud-init document (user-data, meta-data, network-config) is not valid."""


class ImageNotFound(ComputeError):
    """A kernel, initrd, disk image or OCI image archive does not exist."""


class InsufficientResources(ComputeError):
    """The node cannot host the instance (more vCPUs or memory than it has)."""


class InstanceNotFound(ComputeError):
    """No instance of that name is known to the driver."""


class InstanceExists(ComputeError):
    """An instance of that name is already defined."""


class InvalidPowerState(ComputeError):
    """The operation is not allowed in the instance's current power state."""


class NotSupported(ComputeError):
    """The driver does not support this operation (e.g. live-migrating a container)."""


class HypervisorError(ComputeError):
    """The hypervisor or container runtime failed; the message carries its reason."""
