#!/usr/bin/env bash
# Installs what `make test` needs on a Debian machine: the packages whose
# tools judge our output (QEMU, e2fsprogs), a real registry, and pinned Go
# tools. It is quick when everything is already there. As a non-root user,
# or off Debian, it only says what is missing: the tests that need it then
# skip, except under CI=true, where they fail.
set -euo pipefail

# qemu-utils: qemu-img and qemu-io judge our overlays. e2fsprogs: e2fsck,
# dumpe2fs and mkfs.ext4 judge and benchmark base disks. docker-registry
# and apache2-utils (htpasswd): a real registry with basic auth and TLS.
# busybox-static: the test image's content. time: the peak RSS of
# benchmark peers.
apt_packages=(qemu-utils e2fsprogs docker-registry apache2-utils busybox-static time make git)
missing=()
for p in "${apt_packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends "${missing[@]}"
	else
		echo "make deps: missing Debian packages (run as root to install): ${missing[*]}" >&2
	fi
fi

# Go tools, pinned. csi-sanity's CLI is run against a plugin process by
# cmd/boxlite-csi's TestSanityCLI; helm and kubeconform lint, render and
# validate the chart and examples/ offline (test/manifests).
gobin="$(go env GOPATH)/bin"
install_go_tool() { # binary module-path package@version
	local bin=$1 mod=$2 pkg=$3
	local version=${pkg##*@}
	if ! go version -m "$gobin/$bin" 2>/dev/null | grep -q "$mod[[:space:]]*$version"; then
		GOFLAGS= go install "$pkg"
	fi
}
install_go_tool csi-sanity github.com/kubernetes-csi/csi-test/v5 github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.6.0
install_go_tool helm helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm@v3.22.0
install_go_tool kubeconform github.com/yannh/kubeconform github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0
