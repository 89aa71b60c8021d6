#!/bin/sh
# Builds the ax Debian package into OUTDIR (default bin/) with dpkg-deb from a
# staged tree, and prints the .deb's path. Binaries are built without the lab
# tag (no test code) and without cgo (static). No key material is packaged.
#   sh package/build-deb.sh [OUTDIR]
set -eu
cd "$(dirname "$0")/.."
out=$(mkdir -p "${1:-bin}" && cd "${1:-bin}" && pwd)
GO=${GO:-go}

# Version: a tag v1.2 gives 1.2, commits after it 1.2+git<date>.<n>.<hash>;
# without tags, 0.0~git<date>.<hash>. Dates are the commit's, in UTC.
desc=$(git describe --tags --always)
date=$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y%m%d)
hash=$(git rev-parse --short HEAD)
case "$desc" in
v[0-9]*-*-g*) base=${desc#v}; base=${base%-*-g*}; n=${desc%-g*}; n=${n##*-}; version="$base+git$date.$n.$hash" ;;
v[0-9]*) version=${desc#v} ;;
*) version="0.0~git$date.$hash" ;;
esac
echo "$version" | grep -Eq '^[0-9][A-Za-z0-9.+~]*$' || { echo "build-deb: $desc makes no Debian version ($version): tag releases vN.N" >&2; exit 1; }

goarch=$($GO env GOARCH)
case "$goarch" in
amd64 | arm64) arch=$goarch ;;
386) arch=i386 ;;
*) echo "build-deb: no Debian architecture known for GOARCH=$goarch" >&2; exit 1 ;;
esac

# Timestamps in the package and its changelog come from the commit: the same
# commit gives the same package.
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)
export SOURCE_DATE_EPOCH

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/ax"
install -d -m 0755 "$root/DEBIAN" "$root/usr/sbin" "$root/usr/bin" "$root/usr/libexec/ax" "$root/lib/systemd/system" \
	"$root/etc/default" "$root/etc/libvirt/hooks/qemu.d" "$root/usr/share/doc/ax" "$root/usr/share/lintian/overrides" "$root/usr/share/ax/nova"

build() { CGO_ENABLED=0 $GO build -trimpath -ldflags="-s -w -X main.version=$version" -o "$1" "$2"; }
build "$root/usr/sbin/axd" ./cmd/axd
build "$root/usr/bin/axctl" ./cmd/axctl
build "$root/usr/bin/ax-agent" ./cmd/ax-agent
build "$root/usr/libexec/ax/ax-nova-hook" ./nova-hook
# libvirt (>= 6.5) runs every executable in qemu.d as the qemu hook. A
# symlink, not the program: a file under /etc would be a conffile, kept
# at its old version when the package is upgraded.
ln -s /usr/libexec/ax/ax-nova-hook "$root/etc/libvirt/hooks/qemu.d/ax"

install -m 0644 cmd/axd/axd.service cmd/axd/ax-witness.service "$root/lib/systemd/system/"
install -m 0644 cmd/axd/axd.default "$root/etc/default/axd"
install -m 0644 README.md package/copyright "$root/usr/share/doc/ax/"
# Nova's adopting compute driver: Nova loads drivers from its nova.virt
# package only, so the operator links it there on compute hosts (README,
# "On OpenStack"); the package does not write into python3-nova's tree.
install -m 0644 nova-hook/driver/ax_adopt.py "$root/usr/share/ax/nova/"
install -m 0644 package/lintian-overrides "$root/usr/share/lintian/overrides/ax"
{
	printf 'ax (%s) unstable; urgency=medium\n\n' "$version"
	printf '  * Built from git %s (%s).\n\n' "$hash" "$desc"
	printf ' -- AX developers <dev@axproject.invalid>  %s\n' "$(LC_ALL=C TZ=UTC git log -1 --format=%cd --date=format-local:'%a, %d %b %Y %H:%M:%S +0000')"
} | gzip -9n >"$root/usr/share/doc/ax/changelog.gz"
chmod 0644 "$root/usr/share/doc/ax/changelog.gz"

install -m 0644 package/conffiles "$root/DEBIAN/conffiles"
install -m 0755 package/postinst package/postrm "$root/DEBIAN/"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" package/control.in >"$root/DEBIAN/control"

deb="$out/ax_${version}_$arch.deb"
dpkg-deb --build --root-owner-group -Zxz "$root" "$deb" >/dev/null
echo "$deb"
