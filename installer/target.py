"""Pure builders of the installed node's configuration files (golden-tested).

Each function turns answer values into file text; ``installer.install`` writes them.
Network configuration is systemd-networkd's, matched on each NIC's *permanent* MAC
(a bond or VLAN on top of it inherits the MAC but has no permanent one, so it never
matches by accident).
"""

from __future__ import annotations

import json

from installer.answer import Network, NodeAnswer

SERIAL_CONSOLE = "console=tty0 console=ttyS0,115200"
# The kernel's IO-APIC timer check counts ticks in a short window: a virtual machine whose
# host is busy (TCG, an overcommitted hypervisor) misses them and panics ("IO-APIC + timer
# doesn't work!"), seen on this machine's loaded cores; cloud images skip the check too.
NO_TIMER_CHECK = "no_timer_check"
BOND_NAME = "bond0"

GRUB_SERIAL = """serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
"""


def fstab(root_uuid: str, esp_uuid: str) -> str:
    return (
        "# written by the Cairn installer; file systems by UUID\n"
        f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"
        f"UUID={esp_uuid} /boot/efi vfat umask=0077,nofail 0 2\n"
    )


def disk_grub_cfg(root_uuid: str, timeout: int = 1) -> str:
    """The installed disk's grub.cfg, shared by BIOS and UEFI grub. It boots /vmlinuz and
    /initrd.img, the symlinks Debian keeps on the newest kernel, so a kernel upgrade
    needs no grub.cfg change."""
    return (
        GRUB_SERIAL
        + f"set timeout={timeout}\n"
        + "menuentry \"Cairn\" {\n"
        + f"  search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        + "  echo \"CAIRN-GRUB: booting\"\n"
        + f"  linux /vmlinuz root=UUID={root_uuid} ro quiet {NO_TIMER_CHECK} {SERIAL_CONSOLE}\n"
        + "  initrd /initrd.img\n"
        + "}\n"
    )


def efi_early_cfg(root_uuid: str) -> str:
    """Embedded in BOOTX64.EFI: find the root file system, then read its grub.cfg."""
    return (
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        "set prefix=($root)/boot/grub\n"
        "configfile $prefix/grub.cfg\n"
    )


def hostname_file(answer: NodeAnswer) -> str:
    return answer.node_name + "\n"


def hosts_file(answer: NodeAnswer) -> str:
    names = answer.node_name if answer.hostname == answer.node_name else f"{answer.hostname} {answer.node_name}"
    own = str(answer.network.address.ip) if answer.network.address else "127.0.1.1"
    return (
        "127.0.0.1\tlocalhost\n"
        f"{own}\t{names}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\tip6-allnodes\n"
        "ff02::2\tip6-allrouters\n"
    )


def shadow_with_root_hash(shadow: str, password_hash: str) -> str:
    """/etc/shadow with root's password field replaced (every other line untouched)."""
    out, seen = [], False
    for line in shadow.splitlines():
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 2:
            fields[1] = password_hash
            line, seen = ":".join(fields), True
        out.append(line)
    if not seen:
        out.append(f"root:{password_hash}:19000:0:99999:7:::")
    return "\n".join(out) + "\n"


def authorized_keys(answer: NodeAnswer) -> str:
    return "".join(key + "\n" for key in answer.ssh_keys)


def timesyncd_conf(answer: NodeAnswer) -> str | None:
    if not answer.ntp:
        return None
    return "[Time]\nNTP=" + " ".join(answer.ntp) + "\n"


def _ip_section(net: Network) -> list[str]:
    lines = ["[Network]"]
    if net.mode == "dhcp":
        lines.append("DHCP=yes")
    else:
        assert net.address is not None
        lines.append(f"Address={net.address}")
        if net.gateway is not None:
            lines.append(f"Gateway={net.gateway}")
    lines += [f"DNS={d}" for d in net.dns]
    if net.search:
        lines.append("Domains=" + " ".join(net.search))
    return lines


def _link(mtu: int | None) -> list[str]:
    return ["", "[Link]", f"MTUBytes={mtu}"] if mtu else []


def networkd_files(net: Network) -> dict[str, str]:
    """systemd-networkd files (name -> text) for the management network: one NIC or a
    bond of several, optionally a VLAN on top, then DHCP or a static address."""
    files: dict[str, list[str]] = {}
    vlan = f"vlan{net.vlan}" if net.vlan else None
    # what the device under the address does: carry the VLAN, or hold the address itself
    upper = ["[Network]", f"VLAN={vlan}", "LinkLocalAddressing=no"] if vlan else _ip_section(net)
    if net.bond:
        files[f"20-cairn-{BOND_NAME}.netdev"] = [
            "[NetDev]", f"Name={BOND_NAME}", "Kind=bond", *([f"MTUBytes={net.mtu}"] if net.mtu else []),
            "", "[Bond]", f"Mode={net.bond.mode}", "MIIMonitorSec=100ms",
            *(["LACPTransmitRate=fast", "TransmitHashPolicy=layer3+4"] if net.bond.mode == "802.3ad" else []),
        ]
        for i, mac in enumerate(net.bond.macs):
            files[f"10-cairn-{BOND_NAME}-member{i}.network"] = [
                "[Match]", f"PermanentMACAddress={mac}", *_link(net.mtu), "", "[Network]", f"Bond={BOND_NAME}",
            ]
        files[f"30-cairn-{BOND_NAME}.network"] = ["[Match]", f"Name={BOND_NAME}", *_link(net.mtu), "", *upper]
    else:
        files["10-cairn-mgmt.network"] = ["[Match]", f"PermanentMACAddress={net.mac}", *_link(net.mtu), "", *upper]
    if vlan:
        files[f"20-cairn-{vlan}.netdev"] = [
            "[NetDev]", f"Name={vlan}", "Kind=vlan", *([f"MTUBytes={net.mtu}"] if net.mtu else []),
            "", "[VLAN]", f"Id={net.vlan}",
        ]
        files[f"40-cairn-{vlan}.network"] = ["[Match]", f"Name={vlan}", *_link(net.mtu), "", *_ip_section(net)]
    header = ["# written by the Cairn installer from the answer file (NICs by permanent MAC)"]
    return {name: "\n".join([*header, *lines]) + "\n" for name, lines in sorted(files.items())}


def cairn_env(answer: NodeAnswer, data_disks: list[str]) -> str:
    """/etc/cairn/cairn.env, read by every Cairn unit (CAIRN_* settings)."""
    lines = [
        "# Cairn settings for this node (appliance/settings.py); written by the installer",
        "CAIRN_DATA_DIR=/var/lib/cairn",
        f"CAIRN_NODE_NAME={answer.node_name}",
        "CAIRN_WEBUI_DIR=/opt/cairn/webui/dist",
    ]
    if answer.network.mtu:
        lines.append(f"CAIRN_UNDERLAY_MTU={answer.network.mtu}")
    if data_disks:  # stable /dev/disk/by-id paths of the data disks (Ceph OSDs at cluster init/join)
        lines.append("CAIRN_DATA_DISKS=" + ",".join(data_disks))
    return "\n".join(lines) + "\n"


def node_json(answer: NodeAnswer, install_disk: str, data_disks: list[str]) -> str:
    """/etc/cairn/node.json (mode 0600): this node's answer, read by first boot."""
    doc = {"answer": answer.model_dump(mode="json"), "install_disk": install_disk, "data_disks": data_disks}
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
