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
