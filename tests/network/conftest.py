"""Fixtures for the network tests: a three-node lab made of namespaces."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.network.lab import Lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Three simulated nodes on one underlay; removed after the module, also on failure."""
    lab = Lab()
    try:
        yield lab.up()
    finally:
        lab.close()
