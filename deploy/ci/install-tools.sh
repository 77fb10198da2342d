#!/usr/bin/env bash
# The system tools tests/deploy uses: prometheus + promtool and nginx (Debian packages).
# Idempotent: installs only what is missing. Without them those tests skip and say why.
#   bash deploy/ci/install-tools.sh
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

if have prometheus && have promtool && have nginx; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-tools: no apt-get here; install prometheus (with promtool) and nginx yourself" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo -n)
fi

export DEBIAN_FRONTEND=noninteractive
# Another apt run (e.g. unattended upgrades) may hold the lock for a while: wait, bounded.
lock=(-o DPkg::Lock::Timeout=300)
"${sudo[@]}" apt-get "${lock[@]}" update -qq
"${sudo[@]}" apt-get "${lock[@]}" install -y -qq --no-install-recommends prometheus nginx >/dev/null

for tool in prometheus promtool nginx; do
    have "$tool" || { echo "install-tools: $tool still missing" >&2; exit 1; }
done
echo "install-tools: prometheus, promtool and nginx installed"
