#!/usr/bin/env bash
# Headless Chromium for the playground's browser test (tests/test_playground_live.py), from Debian packages.
# Playwright drives it through executable_path=/usr/bin/chromium; never `playwright install` (it downloads
# browsers). Does nothing when /usr/bin/chromium exists; needs root or sudo otherwise.
set -euo pipefail

if [[ -x /usr/bin/chromium ]]; then
    echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present) at /usr/bin/chromium"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: /usr/bin/chromium is missing and apt-get is not available; install Chromium at /usr/bin/chromium" >&2
    exit 1
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "error: installing chromium needs root (run as root or install sudo)" >&2
        exit 1
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation
/usr/bin/chromium --version
