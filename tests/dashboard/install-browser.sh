#!/usr/bin/env bash
# Headless Chromium + chromedriver for tests/dashboard/test_browser.py, from the distribution
# (Debian: chromium + chromium-driver; Ubuntu: chromium-browser + chromium-chromedriver).
# Idempotent: does nothing when both are already installed.
#
# When they cannot be installed here at all (no apt-get, or neither root nor passwordless
# sudo) it says so and exits 0; the browser test then skips and names the reason. An apt
# failure on a machine that could install them (a broken mirror, no network) exits non-zero.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if { have chromium || have chromium-browser; } && have chromedriver; then
    echo "install-browser: chromium and chromedriver already installed"
    exit 0
fi
if ! have apt-get; then
    echo "install-browser: no apt-get here; install Chromium and chromedriver yourself" \
         "(the dashboard browser test will skip)" >&2
    exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if have sudo && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-browser: not root and no passwordless sudo; cannot install Chromium" \
             "(the dashboard browser test will skip)" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
if apt-cache show chromium-driver >/dev/null 2>&1; then
    "${SUDO[@]}" apt-get install -y -qq chromium chromium-driver
else
    "${SUDO[@]}" apt-get install -y -qq chromium-browser chromium-chromedriver
fi
have chromedriver || { echo "install-browser: chromedriver still missing" >&2; exit 1; }
echo "install-browser: installed $(chromedriver --version | head -n1)"
