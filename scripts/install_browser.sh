#!/bin/sh
# Install Debian's Chromium for the browser test (tests/serving/test_browser.py), when it is
# missing and we may install it. Playwright drives this system browser; `playwright install` is
# never used (it downloads browsers from the internet). Without root, or off Debian, this prints
# why and exits 0: the browser test then skips with that reason.
set -eu
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser.sh: $CHROMIUM is missing and we are not root; the browser test will be skipped (run: sudo apt-get install chromium)." >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: $CHROMIUM is missing and apt-get is not available; the browser test will be skipped." >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y chromium
