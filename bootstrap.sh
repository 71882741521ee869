#!/usr/bin/env bash
# Cairn quick start. Two verbs, both idempotent (a second run only checks):
#   ./bootstrap.sh up    install everything, start the embedded single-node appliance
#   ./bootstrap.sh test  install everything, run the whole test suite (lint + pytest)
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
ROOT=$PWD
VENV=$ROOT/.venv
STAMPS=$VENV/.cairn-stamps

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_root() {
  [ "$(id -u)" = 0 ] || { echo "run as root (Cairn manages bridges, guests and Ceph)" >&2; exit 1; }
}

install_debs() {
  local missing=()
  while read -r p; do
    [ -z "$p" ] && continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done < <(grep -vE '^\s*(#|$)' tools/packages.txt)
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Cairn supervises its own daemons: keep package scripts from starting system copies.
  local had_policy=0
  [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  [ $had_policy = 1 ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  apt-get update -qq
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  [ $had_policy = 1 ] || rm -f /usr/sbin/policy-rc.d
}

install_venv() {
  local want
  want=$(cat pyproject.toml | sha256sum | cut -c1-16)
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV (system site packages for Debian's rados/rbd/libvirt bindings)"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  fi
  mkdir -p "$STAMPS"
  if [ "$(cat "$STAMPS/pip" 2>/dev/null)" != "$want" ]; then
    say "installing Python packages"
    "$VENV/bin/pip" install -q --upgrade pip >"$STAMPS/pip.log" 2>&1
    if ! "$VENV/bin/pip" install -q -e ".[test]" >>"$STAMPS/pip.log" 2>&1; then
      cat "$STAMPS/pip.log" >&2
      echo "pip install failed (log above, also in $STAMPS/pip.log)" >&2
      exit 1
    fi
    echo "$want" > "$STAMPS/pip"
  fi
}

install_webui() {
  [ -f webui/package.json ] || return 0
  local want
  want=$(cat webui/package.json webui/package-lock.json 2>/dev/null | sha256sum | cut -c1-16)
  if [ "$(cat "$STAMPS/npm" 2>/dev/null)" != "$want" ] || [ ! -d webui/node_modules ]; then
    say "installing console packages (npm)"
    (cd webui && if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error; else npm install --no-audit --no-fund --loglevel=error; fi)
    echo "$want" > "$STAMPS/npm"
  fi
  # Build the console when its sources (or the packages they build with) change: the stamp
  # hashes every tracked-or-not file under webui/ except node_modules/ and dist/.
  local sources
  sources=$(cd webui && find . \( -path ./node_modules -o -path ./dist \) -prune -o -type f -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
  if [ "$(cat "$STAMPS/webui-build" 2>/dev/null)" != "$sources" ] || [ ! -f webui/dist/index.html ]; then
    say "building the console (webui/dist)"
    if ! (cd webui && npm run build --silent >"$STAMPS/webui-build.log" 2>&1); then
      cat "$STAMPS/webui-build.log" >&2
      echo "console build failed (log above, also in $STAMPS/webui-build.log)" >&2
      exit 1
    fi
    echo "$sources" > "$STAMPS/webui-build"
  fi
}

install_all() {
  need_root
  install_debs
  install_venv
  install_webui
}

case "${1:-}" in
  up)
    shift
    install_all
    ln -sf "$VENV/bin/cairn" /usr/local/bin/cairn  # `cairn` on root's PATH
    exec "$VENV/bin/cairn" up "$@"
    ;;
  test)
    shift
    install_all
    exec "$VENV/bin/python" -m tools.run_tests "$@"
    ;;
  install)
    install_all
    ;;
  *)
    echo "usage: $0 up|test|install" >&2
    exit 2
    ;;
esac
