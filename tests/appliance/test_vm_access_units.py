"""What an unprivileged QEMU is given (appliance/agent/vm_access.py): which Ceph
keyrings it may read, which uid it runs as."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.agent.vm_access import LABEL_FILE, VmAccess, _keyrings
from appliance.settings import Settings
from compute.oci_idmap import IdRanges


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


@pytest.mark.unit
def test_a_label_file_its_qemu_rewrote_gives_it_no_other_vms_uid(tmp_path: Path) -> None:
    """A VM's label file lies in the directory its QEMU owns: a compromised QEMU may
    replace it (naming another VM's uid, or as a link to a host file). The next start
    still runs it as its own uid, writes through no link, and its release gives back
    no other VM's uid."""
    settings = Settings(data_dir=tmp_path / "data")
    access = VmAccess(settings, IdRanges(tmp_path / "registry", scope="unit"))
    mine, theirs = settings.instances_dir / "mine", settings.instances_dir / "theirs"
    uid, gid = access.label(mine)
    their_uid, _ = access.label(theirs)
    assert uid != their_uid and access.label(mine) == (uid, gid)
    assert (mine.stat().st_uid, mine.stat().st_gid, mine.stat().st_mode & 0o777) == (uid, gid, 0o700)
    label = mine / LABEL_FILE
    label.unlink()  # what the directory's owner may do
    label.write_text(json.dumps({"uid": their_uid, "gid": gid}))
    assert access.label(mine) == (uid, gid)
    victim = tmp_path / "host-file"
    victim.write_text("host data\n")
    label.unlink()
    label.symlink_to(victim)
    assert access.label(mine) == (uid, gid)
    assert victim.read_text() == "host data\n" and not label.is_symlink()
    label.unlink()
    label.write_text(json.dumps({"uid": their_uid, "gid": gid}))
    access.release(mine)
    assert access.ranges.holds(theirs, their_uid)
    access.release(theirs)  # its own label: given back (the storage daemon is away here: logged)
    assert not access.ranges.holds(theirs, their_uid)
