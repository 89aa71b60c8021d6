#!/bin/sh
# Builds the Vagrant lab's box (provider libvirt) from Debian packages alone:
# mmdebstrap of Debian 12 with systemd, openssh-server and QEMU, an ext4
# image made from that root without mounting it (mkfs.ext4 -d), qcow2. The
# box boots by direct kernel boot (no bootloader): its kernel and initrd are
# kept beside it, where the Vagrantfile finds them. No key is downloaded:
# the SSH key pair Vagrant logs in with is made here, per build.
#
# Everything lands in $AX_VAGRANT_CACHE (default /var/cache/ax/vagrant) under
# a directory named by a hash of the inputs (this script, the package list,
# the mirror's package versions); "current" points at the last one built.
# The box is added to Vagrant as ax/debian12 (replacing an older one).
#   sh test/vagrant/box.sh
set -eu
cache=${AX_VAGRANT_CACHE:-/var/cache/ax/vagrant}
name=${AX_VAGRANT_BOX:-ax/debian12}
suite=bookworm
# The box's packages: an init and an SSH server for Vagrant; QEMU and the
# tools AX's FT path uses on a hypervisor (nested guests run under TCG, or
# KVM where the host passes it through).
pkgs="systemd,systemd-sysv,dbus,udev,openssh-server,sudo,iproute2,kmod,initramfs-tools,linux-image-cloud-amd64,qemu-system-x86,netcat-openbsd,procps,ca-certificates,e2fsprogs"

if [ "$(id -u)" != 0 ]; then
	echo "box: run as root (mmdebstrap and vagrant-libvirt need it)" >&2
	exit 1
fi
for c in mmdebstrap mkfs.ext4 qemu-img ssh-keygen vagrant; do
	command -v "$c" >/dev/null || { echo "box: $c missing (try: make deps, or apt-get install mmdebstrap e2fsprogs qemu-utils openssh-client vagrant)" >&2; exit 1; }
done

# The key: the script, the packages, and the versions the mirror offers for
# the ones that change most (kernel, QEMU, systemd).
versions=$(apt-cache policy linux-image-cloud-amd64 qemu-system-x86 systemd 2>/dev/null | awk '/Candidate/ {print $2}' | tr '\n' ' ')
key=$( (cat "$0"; echo "$pkgs $suite $versions") | sha256sum | cut -c1-16)
dir="$cache/$key"
box="$dir/ax-debian12.box"
if [ -s "$box" ] && [ -s "$dir/vmlinuz" ] && [ -s "$dir/initrd.img" ] && [ -s "$dir/id_ed25519" ]; then
	echo "box: cached $box" >&2
else
	start=$(date +%s)
	rm -rf "$dir"
	install -d -m 0755 "$cache" "$dir"
	work=$(mktemp -d "$cache/build.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	ssh-keygen -q -t ed25519 -N "" -C "ax-vagrant-$key" -f "$work/id_ed25519"

	# --variant=apt: apt and what it needs, nothing "important" beyond it.
	mmdebstrap --variant=apt --include="$pkgs" \
		--customize-hook='chroot "$1" useradd -m -s /bin/bash -G sudo vagrant' \
		--customize-hook='echo "vagrant ALL=(ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/vagrant"; chmod 0440 "$1/etc/sudoers.d/vagrant"' \
		--customize-hook="install -d -m 0700 \"\$1/home/vagrant/.ssh\"; install -m 0600 \"$work/id_ed25519.pub\" \"\$1/home/vagrant/.ssh/authorized_keys\"; chroot \"\$1\" chown -R vagrant:vagrant /home/vagrant/.ssh" \
		--customize-hook='printf "/dev/vda / ext4 defaults 0 1\n" > "$1/etc/fstab"' \
		--customize-hook='echo ax-box > "$1/etc/hostname"' \
		--customize-hook='printf "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n" > "$1/etc/systemd/network/10-eth0.network"' \
		--customize-hook='chroot "$1" systemctl enable systemd-networkd ssh' \
		--customize-hook='rm -f "$1"/etc/ssh/ssh_host_*; printf "[Unit]\nDescription=SSH host keys\nBefore=ssh.service\nConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\n[Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n[Install]\nWantedBy=multi-user.target\n" > "$1/etc/systemd/system/ssh-hostkeys.service"; chroot "$1" systemctl enable ssh-hostkeys' \
		--customize-hook='echo "UseDNS no" > "$1/etc/ssh/sshd_config.d/ax.conf"' \
		--customize-hook="cp \"\$1\"/boot/vmlinuz-* \"$work/vmlinuz\"; cp \"\$1\"/boot/initrd.img-* \"$work/initrd.img\"" \
		--customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
		"$suite" "$work/root"

	# 3 GiB, sparse: room for AX, a nested guest's RAM file lives on tmpfs.
	mkfs.ext4 -q -L ax-root -d "$work/root" "$work/root.img" 3G
	qemu-img convert -c -O qcow2 "$work/root.img" "$work/box.img"
	vsize=$(qemu-img info --output=json "$work/box.img" | sed -n 's/.*"virtual-size": *\([0-9]*\).*/\1/p' | head -1)
	printf '{"provider":"libvirt","format":"qcow2","virtual_size":%s}\n' $((vsize / 1073741824)) >"$work/metadata.json"
	# The box's own defaults; the kernel, initrd and key are set by the
	# project's Vagrantfile, which knows where this cache is.
	printf 'Vagrant.configure("2") do |c|\n  c.vm.provider :libvirt do |l|\n    l.driver = "qemu"\n  end\nend\n' >"$work/Vagrantfile"
	tar -C "$work" -czf "$work/box.tmp" metadata.json Vagrantfile box.img
	chmod 0644 "$work/vmlinuz" "$work/initrd.img"
	mv "$work/vmlinuz" "$work/initrd.img" "$work/id_ed25519" "$work/id_ed25519.pub" "$dir/"
	mv "$work/box.tmp" "$box"
	end=$(date +%s)
	echo "box: built $box ($(du -m "$box" | cut -f1) MiB) in $((end - start)) s" >&2
fi
ln -sfn "$key" "$cache/current"

# Add it unless Vagrant already has this build (its key is in the version).
if ! vagrant box list 2>/dev/null | grep -q "^$name .*libvirt"; then
	vagrant box add --force --name "$name" "$box" >&2
elif [ "$(cat "$cache/added" 2>/dev/null)" != "$key" ]; then
	vagrant box remove --force --all "$name" >/dev/null 2>&1 || vagrant box remove --force "$name" >&2
	vagrant box add --force --name "$name" "$box" >&2
fi
echo "$key" >"$cache/added"
echo "$box"
