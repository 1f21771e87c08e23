#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kube-scheduler 1.20.2 from Debian's
# `kubernetes` source package with Debian's Go, and installs etcd-server; idempotent.
# The binaries are cached outside the repo, keyed by version:
#   ${AMBIENT_KUBE_CACHE:-/var/cache/ambient}/kubernetes-1.20.2/bin/
# Why a source build: nothing on PyPI/npm ships a kube-apiserver and there is no container
# engine; see the project's notes on building 1.20.2 (reflect2 must be replaced, below).
set -euo pipefail

version=1.20.2
debver=1.20.5+really1.20.2
cache=${AMBIENT_KUBE_CACHE:-/var/cache/ambient}/kubernetes-$version
bin=$cache/bin
want=(kube-apiserver kube-controller-manager kube-scheduler)

have_all() {
  for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done
  command -v etcd >/dev/null
}
if have_all; then echo "kube-build.sh: cached ($bin)"; exit 0; fi

[ "$(id -u)" = 0 ] || { echo "kube-build.sh: must run as root (apt)" >&2; exit 1; }
# One build at a time per machine (parallel checkouts share the cache).
mkdir -p "$cache"
exec 9>"$cache/.lock"; flock 9
if have_all; then echo "kube-build.sh: cached ($bin)"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive

# deb-src entries mirroring the machine's deb entries (same URIs/suites), once.
src=/etc/apt/sources.list.d/ambient-deb-src.sources
list=/etc/apt/sources.list.d/ambient-deb-src.list
if [ ! -e "$src" ] && [ ! -e "$list" ]; then
  if [ -e /etc/apt/sources.list.d/debian.sources ]; then  # deb822 (Debian 12's default)
    sed -n '/^Types: deb$/,/^$/p' /etc/apt/sources.list.d/debian.sources \
      | sed 's/^Types: deb$/Types: deb-src/' > "$src"
    grep -q '^Types: deb-src' "$src" || { rm -f "$src"; echo "kube-build.sh: no deb entries to mirror" >&2; exit 1; }
  else  # one-line format
    grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | sed 's/^deb /deb-src /' > "$list"
    [ -s "$list" ] || { rm -f "$list"; echo "kube-build.sh: no deb entries to mirror" >&2; exit 1; }
  fi
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends golang-go rsync make \
  golang-github-modern-go-reflect2-dev etcd-server dpkg-dev >/dev/null

if [ ! -x "$bin/kube-apiserver" ] || [ ! -x "$bin/kube-controller-manager" ] || [ ! -x "$bin/kube-scheduler" ]; then
  work=$cache/src
  rm -rf "$work"; mkdir -p "$work"; cd "$work"
  apt-get source --download-only kubernetes >/dev/null
  tar xzf "kubernetes_$debver.orig.tar.gz"
  cd "kubernetes-$version"
  # The vendored reflect2 1.0.1 segfaults under Go >= 1.18 (first custom resource create):
  # replace it with Debian's packaged reflect2, keeping the vendored LICENSE.
  v=vendor/github.com/modern-go/reflect2
  cp "$v/LICENSE" ../reflect2-LICENSE && rm -rf "$v" && mkdir -p "$v"
  cp -a /usr/share/gocode/src/github.com/modern-go/reflect2/. "$v/"
  rm -f "$v/go.mod"; cp ../reflect2-LICENSE "$v/LICENSE"
  start=$(date +%s)
  CGO_ENABLED=0 HOME=$(mktemp -d) GOFLAGS= make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler"
  echo "kube-build.sh: built in $(( $(date +%s) - start )) s"
  mkdir -p "$bin"
  for b in "${want[@]}"; do install -m 0755 "_output/local/bin/linux/amd64/$b" "$bin/$b"; done
  cd /; rm -rf "$work"
fi
have_all || { echo "kube-build.sh: binaries missing after build" >&2; exit 1; }
echo "kube-build.sh: ready ($bin)"
