#!/usr/bin/env bash
# Installs what lazypull's build, tests and demo need on a Debian 12 machine.
# Idempotent: packages already present are not touched. Run as root.
set -euo pipefail

CONTAINERD2_VERSION="${CONTAINERD2_VERSION:-v2.4.2}"
PREFIX="${LAZYPULL_TOOLS:-/usr/local/lib/lazypull-tools}"

# stargz-snapshotter ships only /usr/bin/ctr-remote (0.12): the interop test
# integration/ctrremote_test.go converts images with it.
need=()
for pkg in containerd runc fuse3 docker-registry debootstrap busybox-static ca-certificates git make gcc stargz-snapshotter; do
	dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
	echo "install-deps: apt-get install ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's docker-registry package starts a registry on :5000 by default;
# lazypull's tests and demo start their own, so keep the packaged one quiet.
if systemctl is-active --quiet docker-registry 2>/dev/null; then
	systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

# containerd 2.x is not packaged for Debian 12; build it from its Go module
# into a private prefix so it never shadows the packaged containerd 1.6.
# Its runc shim is built too: the integration tests put $PREFIX/bin first in
# the PATH of a containerd 2.x daemon so that it runs its own shim, not
# Debian's 1.6 one from /usr/bin.
if [ ! -x "$PREFIX/bin/containerd" ] || [ ! -x "$PREFIX/bin/containerd-shim-runc-v2" ] ||
	! "$PREFIX/bin/containerd" --version 2>/dev/null | grep -q "$CONTAINERD2_VERSION"; then
	echo "install-deps: building containerd $CONTAINERD2_VERSION into $PREFIX/bin"
	mkdir -p "$PREFIX/bin"
	GOBIN="$PREFIX/bin" GOFLAGS=-buildvcs=false go install \
		-ldflags "-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD2_VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD2_VERSION" \
		"github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD2_VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD2_VERSION"
fi

modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
[ -c /dev/fuse ] || { echo "install-deps: /dev/fuse is missing; FUSE mounts cannot work here" >&2; exit 1; }

# Kubernetes node tests (integration/k8s_test.go): Debian's CNI plugins
# (/usr/lib/cni) for pod sandboxes, and crictl built from cri-tools' Go
# module into the same private prefix.
CRI_TOOLS_VERSION="${CRI_TOOLS_VERSION:-v1.37.0}"
if ! dpkg-query -W -f='${Status}' containernetworking-plugins 2>/dev/null | grep -q "install ok installed"; then
	echo "install-deps: apt-get install containernetworking-plugins"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq --no-install-recommends containernetworking-plugins >/dev/null 2>&1 ||
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends containernetworking-plugins >/dev/null; }
fi
if [ ! -x "$PREFIX/bin/crictl" ] || ! "$PREFIX/bin/crictl" --version 2>/dev/null | grep -q "$CRI_TOOLS_VERSION"; then
	echo "install-deps: building crictl $CRI_TOOLS_VERSION into $PREFIX/bin"
	mkdir -p "$PREFIX/bin"
	GOBIN="$PREFIX/bin" GOFLAGS=-buildvcs=false go install \
		-ldflags "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION" \
		"sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION"
fi
# critest is a Go test binary: build it in a scratch module that requires
# cri-tools at the same version.
if [ ! -x "$PREFIX/bin/critest" ] || [ ! -f "$PREFIX/bin/critest.version" ] || [ "$(cat "$PREFIX/bin/critest.version")" != "$CRI_TOOLS_VERSION" ]; then
	echo "install-deps: building critest $CRI_TOOLS_VERSION into $PREFIX/bin"
	scratch="$(mktemp -d)"
	(
		cd "$scratch"
		go mod init critestbuild >/dev/null 2>&1
		printf '//go:build tools\n\npackage tools\n\nimport _ "sigs.k8s.io/cri-tools/pkg/validate"\n' >tools.go
		go get "sigs.k8s.io/cri-tools@$CRI_TOOLS_VERSION" >/dev/null 2>&1
		go mod tidy >/dev/null 2>&1
		GOFLAGS=-buildvcs=false go test -c -o "$PREFIX/bin/critest" sigs.k8s.io/cri-tools/cmd/critest
	)
	rm -rf "$scratch"
	echo "$CRI_TOOLS_VERSION" >"$PREFIX/bin/critest.version"
fi
