#!/usr/bin/env bash
# Debian packages the tests use: Mosquitto (a real MQTT broker the tests start on a free
# port with their own config) and Chromium (the console's browser tests drive Debian's
# chromium through Playwright; Playwright never downloads a browser of its own). Installs
# what is missing when run as root; otherwise says what to install and fails.
# With --bench, also nghttp2-client: its h2load is the benchmarks' load generator.
set -euo pipefail
need=()
if [ "${1:-}" = "--bench" ]; then
  command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
fi
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || need+=(mosquitto)
[ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "missing Debian packages: ${need[*]}" >&2
  echo "install them with: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
