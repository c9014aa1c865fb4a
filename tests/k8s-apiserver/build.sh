#!/bin/bash
# Build a standalone CRD-serving Kubernetes API server from Debian sid packages only.
# usage: build.sh CHROOT_DIR   (needs root, debootstrap, network access to deb.debian.org)
# The project's own copy of the recipe (`make apiserver` runs it): nothing outside the
# repository is needed. Facts about what the resulting server does: README.md beside it.
set -euo pipefail
R=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/hyperfleet-k8s/chroot}
SRC=$(cd "$(dirname "$0")" && pwd)/src
t() { local s=$(date +%s); "$@"; echo "[time] $(( $(date +%s)-s ))s: $*" >&2; }
command -v debootstrap >/dev/null || t apt-get install -y -qq debootstrap
[ -x "$R/usr/bin/apt-get" ] || t debootstrap --variant=minbase sid "$R" http://deb.debian.org/debian >/dev/null
mountpoint -q "$R/proc" || mount -t proc proc "$R/proc"
mountpoint -q "$R/dev" || mount --bind /dev "$R/dev"
trap 'umount "$R/dev" "$R/proc" 2>/dev/null || true' EXIT
cp /etc/resolv.conf "$R/etc/resolv.conf"
A="-o Acquire::Check-Valid-Until=false"   # sid Release file may look expired to this machine's clock
t chroot "$R" apt-get $A update -qq
t chroot "$R" env DEBIAN_FRONTEND=noninteractive apt-get $A install -y -qq --no-install-recommends \
   golang-go golang-k8s-apiextensions-apiserver-dev etcd-server >/dev/null
mkdir -p "$R/root/go/src/localtest/crdapiserver" "$R/root/out"
cp "$SRC"/*.go "$R/root/go/src/localtest/crdapiserver/"
GOENV="HOME=/root GO111MODULE=off GOPATH=/root/go:/usr/share/gocode GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0"
# upstream standalone server (unmodified main.go), for reference
t chroot "$R" env $GOENV sh -c 'cd /usr/share/gocode/src/k8s.io/apiextensions-apiserver && go build -o /root/out/apiextensions-apiserver .'
# wrapper: + root /apis discovery with CRD groups, /openapi/v2, core/v1 subset, no Service informer
t chroot "$R" env $GOENV sh -c 'cd /root/go/src/localtest/crdapiserver && go build -ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v1.36.4 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36 -X k8s.io/component-base/version.gitTreeState=clean" -o /root/out/crd-apiserver .'
ls -la "$R/root/out"
