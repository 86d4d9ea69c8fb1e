#!/usr/bin/env bash
# Installs Debian's Chromium and chromedriver when missing: the console's browser tests
# (scheduler/tests/it/web_ui.rs) drive headless Chromium through chromedriver.
set -euo pipefail
if [ -x "${CHROMIUM:-/usr/bin/chromium}" ] && [ -x "${CHROMEDRIVER:-/usr/bin/chromedriver}" ]; then
  exit 0
fi
echo "chromium or chromedriver not found: installing them with apt-get" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
