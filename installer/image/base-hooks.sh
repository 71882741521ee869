#!/bin/sh
# mmdebstrap customize hook for the base layer; runs on the build host, $1 is the new root.
# DISABLED_UNITS and DROPPED_MODULES come from installer/build.py.
set -e
R="$1"
# Every node makes its own identity when it is installed: SSH host keys, machine-id.
rm -f "$R"/etc/ssh/ssh_host_*
: > "$R"/etc/machine-id
rm -f "$R"/var/lib/dbus/machine-id
# The live installer's console logs in without a password; an installed node gets the
# answer file's password hash instead.
chroot "$R" passwd -dq root
echo cairn-installer > "$R"/etc/hostname
# systemd-networkd (configured by the installer, NICs by MAC), resolved and timesyncd.
chroot "$R" systemctl enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service
# Engines Cairn configures and starts itself (cluster formation) stay off until then.
for unit in $DISABLED_UNITS; do
  if [ -e "$R/lib/systemd/system/$unit" ]; then chroot "$R" systemctl disable "$unit"; fi
done
# Kernel modules a server appliance never loads.
for dir in $DROPPED_MODULES; do rm -rf "$R"/lib/modules/*/"$dir"; done
for k in "$R"/lib/modules/*; do chroot "$R" depmod "$(basename "$k")"; done
# Debian's libvirtd runs the node's VMs. QEMU shows the node's NBD client certificate
# (appliance/pki.py, issued by the agent into data_dir/nbd-client) to the storage daemons
# that serve nbds:// disks; libvirtd does not start unless the folder exists.
install -d -m 0700 "$R"/var/lib/cairn "$R"/var/lib/cairn/nbd-client
printf '\n# Cairn: the client certificate of nbds:// disks (CAIRN_DATA_DIR/nbd-client)\nnbd_tls_x509_cert_dir = "/var/lib/cairn/nbd-client"\n' >> "$R"/etc/libvirt/qemu.conf
# A hypervisor's libvirtd stays up: no exit after 120 s without clients (Debian's default).
printf '\n# Cairn: libvirtd runs for as long as the node does\nLIBVIRTD_ARGS=""\n' >> "$R"/etc/default/libvirtd
