#!/bin/sh
# Installs what test/e2e needs on a Debian 12 machine; safe to run again.
# Kubernetes, external-provisioner and helm are not installed here: the
# test builds them from the Go module proxy and caches them under
# /var/cache/boxlite-e2e (BOXLITE_E2E_CACHE) on first use.
set -eu
if [ "$(id -u)" != 0 ]; then
	# Not an error: the e2e test itself skips without root and says why.
	echo "install-deps.sh: not root, installing nothing" >&2
	exit 0
fi
pkgs="etcd-server containerd runc containernetworking-plugins docker-registry
qemu-system-x86 qemu-utils e2fsprogs busybox-static iproute2 mount"
missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing="$missing $p"
done
if [ -n "$missing" ]; then
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
	# Debian starts etcd, containerd and the registry on install where
	# systemd runs; the e2e runs its own on the same ports. Stop only the
	# services this script just installed, never ones already in use.
	if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
		for s in $missing; do
			case $s in
			etcd-server) systemctl disable --now etcd 2>/dev/null || true ;;
			containerd | docker-registry) systemctl disable --now "$s" 2>/dev/null || true ;;
			esac
		done
	fi
fi
command -v go >/dev/null || { echo "install-deps.sh: go is required" >&2; exit 1; }
