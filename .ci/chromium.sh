#!/usr/bin/env bash
# Installs Chromium from Debian's packages for the browser tests (tests/sfu/test_browser.py).
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
fi
