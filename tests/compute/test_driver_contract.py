"""The same lifecycle assertions against the fake drivers and the real ones."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from compute.driver import ComputeDriver
from compute.errors import InstanceExists, InstanceNotFound, InsufficientResources, InvalidPowerState
from compute.fake import fake_container_driver, fake_vm_driver
from compute.libvirt_driver import LibvirtDriver
from compute.spec import ContainerSpec, PowerState, VmSpec
from compute.testguest import MARKER
from tests.compute.conftest import CONTAINER_MARKER, wait_for_console

pytestmark = pytest.mark.contract


@dataclasses.dataclass
class Subject:
    driver: ComputeDriver[Any]
    make_spec: Callable[[str], Any]
    marker: bytes
    real: bool


@pytest.fixture(params=["fake-vm", "libvirt", "fake-container", "crun", "vm-isolated-container"])
def subject(
    request: pytest.FixtureRequest,
    make_vm_spec: Callable[..., VmSpec],
    make_container_spec: Callable[..., ContainerSpec],
) -> Iterator[Subject]:
    if request.param == "fake-vm":
        yield Subject(fake_vm_driver(cpus=2), make_vm_spec, b"CAIRN-MARKER", real=False)
        return
    if request.param == "fake-container":
        yield Subject(fake_container_driver(cpus=2), make_container_spec, b"CAIRN-MARKER", real=False)
        return
    if request.param in ("crun", "vm-isolated-container"):
        oci: ComputeDriver[ContainerSpec] = request.getfixturevalue(
            "oci_driver" if request.param == "crun" else "vm_isolated_driver")
        made: list[str] = []

        def make_c(name: str) -> ContainerSpec:
            spec = make_container_spec(name, isolation="vm" if request.param != "crun" else "container")
            made.append(spec.name)
            return spec

        yield Subject(oci, make_c, CONTAINER_MARKER, real=True)
        for name in made:
            oci.delete(name)
        return
    driver: LibvirtDriver = request.getfixturevalue("vm_driver")
    created: list[str] = []

    def make(name: str) -> VmSpec:
        spec = make_vm_spec(name)
        created.append(spec.name)
        return spec

    yield Subject(driver, make, MARKER.encode(), real=True)
    for name in created:
        driver.delete(name)


def test_spawned_instance_runs_and_shows_its_marker_then_stops_and_is_deleted(subject: Subject) -> None:
    d = subject.driver
    spec = subject.make_spec("life")
    d.spawn(spec)
    assert spec.name in d.list_instances()
    wait_for_console(lambda: d.console_log(spec.name), subject.marker)
    assert d.power_state(spec.name) is PowerState.RUNNING
    assert d.consoles(spec.name), "a running instance has at least one console endpoint"
    d.pause(spec.name)
    assert d.power_state(spec.name) is PowerState.PAUSED
    with pytest.raises(InvalidPowerState):
        d.pause(spec.name)
    d.resume(spec.name)
    assert d.power_state(spec.name) is PowerState.RUNNING
    d.stop(spec.name, timeout=1.0)
    assert d.power_state(spec.name) is PowerState.SHUTDOWN
    with pytest.raises(InvalidPowerState):
        d.reboot(spec.name)
    d.delete(spec.name)
    assert spec.name not in d.list_instances()
    with pytest.raises(InstanceNotFound):
        d.power_state(spec.name)
    d.delete(spec.name)  # idempotent


def test_defining_a_taken_name_raises_instance_exists(subject: Subject) -> None:
    spec = subject.make_spec("dup")
    subject.driver.define(spec)
    with pytest.raises(InstanceExists):
        subject.driver.define(spec)
    subject.driver.delete(spec.name)


def test_more_vcpus_than_the_node_has_is_refused_naming_the_shortfall(subject: Subject) -> None:
    cpus = subject.driver.resources().cpus
    spec = dataclasses.replace(subject.make_spec("big"), vcpus=cpus + 1)
    with pytest.raises(InsufficientResources, match=f"{cpus + 1} vCPUs"):
        subject.driver.define(spec)
    assert spec.name not in subject.driver.list_instances()


def test_operations_on_an_unknown_instance_raise_instance_not_found(subject: Subject) -> None:
    for op in (subject.driver.start, subject.driver.pause, subject.driver.console_log):
        with pytest.raises(InstanceNotFound):
            op("cz-no-such-instance")
