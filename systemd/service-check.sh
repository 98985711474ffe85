#!/usr/bin/env bash
# Checks systemd/node-mirror.service the way `make service-check` (and so .ci/run) does:
#   1. `systemd-analyze verify` prints nothing about the unit and exits 0;
#   2. `systemd-analyze security --offline=true` rates its exposure at MAX (2.0) or lower.
# Neither needs a running systemd. verify insists that ExecStart's binary exists, so it
# checks a copy of the unit whose ExecStart points at BIN (the freshly built binary).
#
# usage: systemd/service-check.sh BIN [MAX]
set -euo pipefail

bin=${1:?usage: $0 BIN [MAX]}
max=${2:-2.0}
unit=systemd/node-mirror.service
cd "$(dirname "$0")/.."

if ! command -v systemd-analyze >/dev/null; then
  echo "service-check: systemd-analyze not found; install it: apt-get install systemd" >&2
  exit 1
fi
# --offline= arrived in systemd 250.
ver=$(systemd-analyze --version | awk 'NR==1 {print $2}')
if [ "${ver%%[!0-9]*}" -lt 250 ]; then
  echo "service-check: systemd $ver is too old for 'systemd-analyze security --offline' (need 250+)" >&2
  exit 1
fi
[ -x "$bin" ] || { echo "service-check: $bin is not an executable (run make build)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s|/usr/local/bin/node-mirror|$(realpath "$bin")|g" "$unit" > "$tmp/node-mirror.service"

# verify exits 0 on unknown keys and bad values (it only warns), so any line about our
# unit fails the check. Lines about other units it loads (targets, containerd.service)
# are shown but are not ours to fix.
set +e
out=$(cd "$tmp" && systemd-analyze verify ./node-mirror.service 2>&1)
rc=$?
set -e
if [ $rc -ne 0 ] || grep -q 'node-mirror\.service' <<<"$out"; then
  echo "service-check: systemd-analyze verify $unit failed (exit $rc):" >&2
  echo "$out" >&2
  exit 1
fi
[ -z "$out" ] || { echo "service-check: verify said, about other units:"; echo "$out"; }
echo "service-check: systemd-analyze verify $unit: clean"

report=$(systemd-analyze security --offline=true --no-pager "$tmp/node-mirror.service" 2>&1) || {
  echo "$report" >&2; echo "service-check: systemd-analyze security failed" >&2; exit 1; }
score=$(sed -n 's/.*Overall exposure level for node-mirror\.service: \([0-9.]*\).*/\1/p' <<<"$report")
if [ -z "$score" ]; then
  echo "$report" >&2
  echo "service-check: no exposure level in systemd-analyze security's output" >&2
  exit 1
fi
if awk -v s="$score" -v m="$max" 'BEGIN { exit !(s > m) }'; then
  # Show what is still exposed, so the failure says what to fix.
  grep '✗' <<<"$report" >&2 || true
  echo "service-check: exposure $score is above $max" >&2
  exit 1
fi
echo "service-check: systemd-analyze security: exposure $score (limit $max); still exposed:"
grep '✗' <<<"$report" | sed 's/^/  /' || true
