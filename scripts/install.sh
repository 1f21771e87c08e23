#!/usr/bin/env bash
# Idempotent install for a Debian 12 host (root): apt packages, kernel header links for bcc,
# bpffs, and the project venv (.venv) with the project installed editable and bcc linked in.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

[ "$(id -u)" = 0 ] || { echo "install.sh: must run as root (netns, cgroups and eBPF need it)" >&2; exit 1; }

# chromium: the dashboard test drives Debian's browser with Playwright (pip, from pyproject's
# test extra); no browser is ever downloaded (`playwright install` is not run).
apt_pkgs=(python3 python3-venv python3-bpfcc libbpfcc linux-headers-amd64 bpftool iproute2
          openssl procps util-linux tcpdump iperf3 curl ca-certificates wrk nginx-light chromium strace)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install.sh: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Prometheus for `ambient up --prometheus` and the observability tests. Debian's package
# ships a service that would listen on *:9090; a policy-rc.d (only if there is none already,
# removed again after) keeps invoke-rc.d from starting it: local mode runs its own Prometheus
# on 127.0.0.1 with its own config and data directory.
if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q 'install ok installed'; then
  echo "install.sh: apt-get install prometheus (its Debian service is not started)"
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 prometheus >/dev/null \
    || { if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit 1; }
  if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  # Never at boot either (a no-op where systemd is not running).
  command -v systemctl >/dev/null && systemctl disable prometheus >/dev/null 2>&1 || true
fi

# bcc compiles against Debian's headers; the running kernel may be newer and have no
# /lib/modules entry, so link the installed -amd64/-common header trees (found by glob).
kmod=/lib/modules/$(uname -r)
build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
mkdir -p "$kmod"
[ -e "$kmod/build" ] || ln -sfn "$build" "$kmod/build"
[ -e "$kmod/source" ] || ln -sfn "$common" "$kmod/source"

# /etc/hosts as Debian's installer writes it: localhost, and this machine's name on 127.0.1.1.
# The kubelet stand-in (Kubernetes mode) binds each pod's hosts file over /etc/hosts, so the
# mount point must exist (a bare debootstrap root has none); and a pod resolving the machine's
# name (Python's http.server does, through socket.getfqdn) must find it here: the simulated
# network has no route out, so a DNS query from a pod hangs for the resolver's timeouts.
hosts=/etc/hosts
[ -e "$hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n' > "$hosts"
me=$(uname -n)
grep -qE "^[^#]*[[:space:]]$me([[:space:]]|\$)" "$hosts" || printf '127.0.1.1\t%s\n' "$me" >> "$hosts"

# bpffs for pinned links and maps.
mountpoint -q /sys/fs/bpf 2>/dev/null || mount -t bpf bpf /sys/fs/bpf

# venv from Debian's python3 (the interpreter python3-bpfcc is built for).
py=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.base_prefix == "/usr" else 1)'; then
  rm -rf .venv
  "$py" -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -e "$site/bcc" ] || ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[test]"
  rm -f .venv/.installed-*; touch "$stamp"
fi
.venv/bin/python -c 'import bcc, pyroute2, cryptography, uvloop, yaml, h2' \
  || { echo "install.sh: venv imports failed" >&2; exit 1; }
# A real Kubernetes control plane (etcd + kube-apiserver/-controller-manager/-scheduler 1.20.2)
# for the tests/kubernetes tier: built from Debian's source package once, cached outside the repo.
bash scripts/kube-build.sh
echo "install.sh: ready ($root/.venv)"
