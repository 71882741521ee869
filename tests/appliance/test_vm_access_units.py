"""Which Ceph keyrings an unprivileged QEMU is given read access to (appliance/agent/vm_access.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.agent.vm_access import _keyrings


@pytest.mark.unit
def test_only_client_keyrings_without_metavariables_are_granted(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nfsid = x\nkeyring = /etc/ceph/ceph.client.admin.keyring\n"
                    "[mon]\nkeyring = /var/lib/cairn/ceph/mon/$id/keyring\n"
                    "[osd.0]\nkeyring = /var/lib/cairn/ceph/osd/0/keyring\n"
                    "[client.cairn]\nkeyring = /etc/ceph/cairn.keyring\n"
                    "[client]\nkeyring = /etc/ceph/$cluster.$name.keyring\n")
    assert _keyrings(conf) == [Path("/etc/ceph/ceph.client.admin.keyring"), Path("/etc/ceph/cairn.keyring")]
    assert _keyrings(tmp_path / "missing.conf") == []
