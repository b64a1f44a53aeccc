#!/usr/bin/env bash
# Install or upgrade edgeproxy as a systemd service from the single file edgeproxy.pyz.
#
#   sudo ./deploy/install.sh [--dry-run] [--pyz PATH]
#
# Idempotent: run it again to upgrade (it replaces the pyz, the unit and the CLI wrapper,
# then says whether a restart is due). It never overwrites /etc/edgeproxy/relay.yaml or
# /etc/edgeproxy/env once they exist. What it does:
#   - creates the system user and group `edgeproxy` (no login, home /var/lib/edgeproxy)
#   - /opt/edgeproxy/edgeproxy.pyz                  the relay (0644)
#   - /etc/edgeproxy/                               0750 root:edgeproxy
#   - /etc/edgeproxy/relay.yaml                     from ./relay.yaml if absent (0640 root:edgeproxy)
#   - /etc/edgeproxy/env                            from deploy/edgeproxy.env.example if absent (0600 root)
#   - /var/lib/edgeproxy/                           state: database, extracted pyz (0750 edgeproxy)
#   - /etc/systemd/system/edgeproxy.service         the unit, then `systemctl daemon-reload`
#   - /usr/local/bin/edgeproxy                      CLI wrapper: `sudo edgeproxy keys create alice`
#
# --pyz PATH   the file to install (default: dist/edgeproxy.pyz or edgeproxy.pyz in the
#              directory that holds deploy/, else ./edgeproxy.pyz)
# --dry-run    print what would be done and change nothing (no root needed)
# EDGEPROXY_PREFIX=/some/dir puts every path above under that directory instead of /
# (for tests and image builds); then systemctl is not called and root is not required.
set -euo pipefail

USER_NAME=edgeproxy
PREFIX=${EDGEPROXY_PREFIX:-}
PREFIX=${PREFIX%/}
src=$(cd "$(dirname "$0")/.." && pwd)

dry_run=false
pyz=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|-n) dry_run=true; shift ;;
    --pyz) pyz=${2:?--pyz needs a path}; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "install.sh: $*" >&2; exit 1; }
note() { echo "  $*"; }
# run CMD...: print it as a shell command line; run it unless --dry-run.
run() {
  if $dry_run; then
    echo "would run: $(printf '%q ' "$@")"
  else
    echo "+ $(printf '%q ' "$@")"
    "$@"
  fi
}
# put SRC DEST MODE: install a file we own, atomically, only when it differs; sets changed.
changed=false
put() {
  local from=$1 to=$2 mode=$3
  if [ -f "$to" ] && cmp -s "$from" "$to"; then
    note "unchanged: $to"
    return 0
  fi
  run install -m "$mode" "$from" "$to.new"
  run mv -f "$to.new" "$to"
  changed=true
}
# seed SRC DEST MODE OWNER:GROUP: install a file the operator owns, only if it is absent.
seed() {
  local from=$1 to=$2 mode=$3 owner=$4
  if [ -e "$to" ]; then
    note "kept: $to exists and is never overwritten"
    return 0
  fi
  run install -m "$mode" "$from" "$to"
  run chown "$owner" "$to"
}

# --- what to install --------------------------------------------------------------------
if [ -z "$pyz" ]; then
  for candidate in "$src/dist/edgeproxy.pyz" "$src/edgeproxy.pyz" ./edgeproxy.pyz; do
    if [ -f "$candidate" ]; then pyz=$candidate; break; fi
  done
fi
if [ -z "$pyz" ] || [ ! -f "$pyz" ]; then
  die "no edgeproxy.pyz${pyz:+ at $pyz}: build it with scripts/build_pyz.sh, or pass --pyz PATH"
fi
unit_src=$src/deploy/edgeproxy.service
env_src=$src/deploy/edgeproxy.env.example
config_src=$src/relay.yaml
for f in "$unit_src" "$env_src" "$config_src"; do
  [ -f "$f" ] || die "missing $f (run this script from an edgeproxy checkout or release)"
done

if ! $dry_run && [ -z "$PREFIX" ] && [ "$(id -u)" != 0 ]; then
  die "run as root (sudo $0), or with --dry-run to see what it would do"
fi

opt=$PREFIX/opt/edgeproxy
etc=$PREFIX/etc/edgeproxy
state=$PREFIX/var/lib/edgeproxy
unit=$PREFIX/etc/systemd/system/edgeproxy.service
wrapper=$PREFIX/usr/local/bin/edgeproxy

$dry_run && echo "dry run: nothing is changed"
echo "installing edgeproxy from $pyz${PREFIX:+ under $PREFIX}"

# The unit runs /usr/bin/python3: prove this file runs on it before replacing anything
# (a pyz built for another Python version or CPU says so and exits 1).
if ! $dry_run; then
  [ -x /usr/bin/python3 ] || die "/usr/bin/python3 not found: install it (apt-get install python3)"
  probe=$(mktemp -d)
  if ! version=$(SHIV_ROOT=$probe /usr/bin/python3 "$pyz" --version 2>&1); then
    rm -rf "$probe"
    die "$pyz does not run on /usr/bin/python3: $version"
  fi
  rm -rf "$probe"
  note "checked: $version runs on $(/usr/bin/python3 --version 2>&1)"
fi

# --- user -------------------------------------------------------------------------------
if getent passwd "$USER_NAME" >/dev/null; then
  note "user $USER_NAME exists"
else
  run useradd --system --user-group --home-dir /var/lib/edgeproxy --no-create-home \
    --shell /usr/sbin/nologin --comment "edgeproxy LLM API relay" "$USER_NAME"
fi

# --- directories ------------------------------------------------------------------------
# directory MODE OWNER:GROUP PATH: create it if absent (an existing one is left as it is).
directory() {
  if [ ! -d "$3" ]; then
    run install -d -m "$1" "$3"
    run chown "$2" "$3"
  fi
}
directory 0755 root:root "$opt"
directory 0750 "root:$USER_NAME" "$etc"
directory 0750 "$USER_NAME:$USER_NAME" "$state"
directory 0755 root:root "$(dirname "$unit")"
directory 0755 root:root "$(dirname "$wrapper")"

# --- files ------------------------------------------------------------------------------
put "$pyz" "$opt/edgeproxy.pyz" 0644
put "$unit_src" "$unit" 0644
restart_due=$changed
seed "$config_src" "$etc/relay.yaml" 0640 "root:$USER_NAME"
seed "$env_src" "$etc/env" 0600 "root:root"
if [ -f "$etc/env" ] && [ "$(stat -c %a "$etc/env")" != 600 ]; then
  note "warning: $etc/env is mode $(stat -c %a "$etc/env"); it holds provider keys: chmod 600 it"
fi

# The CLI as the service runs it: same user, config, database and environment, so keys
# made by hand never leave root-owned files in the state directory.
wrapper_tmp=$(mktemp)
trap 'rm -f "$wrapper_tmp"' EXIT
cat >"$wrapper_tmp" <<'WRAPPER'
#!/bin/sh
# edgeproxy CLI for the installed service (written by deploy/install.sh; replaced on upgrade).
# Runs /opt/edgeproxy/edgeproxy.pyz as the edgeproxy user with the service's config,
# database and /etc/edgeproxy/env, e.g.  sudo edgeproxy keys create alice
set -eu
if [ "$(id -u)" != 0 ]; then
  echo "edgeproxy: run it as root (sudo edgeproxy ...): it reads /etc/edgeproxy/env" >&2
  exit 1
fi
# KEY=value lines as systemd reads them; comments and blank lines skipped, no shell evaluation.
if [ -r /etc/edgeproxy/env ]; then
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in '' | '#'* | ';'*) continue ;; esac
    key=${line%%=*}
    value=${line#*=}
    case "$value" in \"*\") value=${value#\"}; value=${value%\"} ;; \'*\') value=${value#\'}; value=${value%\'} ;; esac
    export "$key=$value"
  done </etc/edgeproxy/env
fi
exec runuser -u edgeproxy -- env \
  SHIV_ROOT=/var/lib/edgeproxy/.shiv \
  EDGEPROXY_CONFIG=/etc/edgeproxy/relay.yaml \
  EDGEPROXY_DATABASE=/var/lib/edgeproxy/edgeproxy.db \
  EDGEPROXY_DEMO=false \
  /usr/bin/python3 /opt/edgeproxy/edgeproxy.pyz "$@"
WRAPPER
put "$wrapper_tmp" "$wrapper" 0755

# --- systemd ----------------------------------------------------------------------------
if [ -n "$PREFIX" ]; then
  note "skipped: systemctl daemon-reload (installing under $PREFIX, not the live system)"
elif [ ! -d /run/systemd/system ]; then
  note "skipped: systemctl daemon-reload (systemd is not running here)"
else
  run systemctl daemon-reload
fi

echo
if $dry_run; then
  echo "dry run done: nothing was changed"
elif [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && systemctl is-active --quiet edgeproxy; then
  if $restart_due; then
    echo "edgeproxy is running the old version: sudo systemctl restart edgeproxy"
  else
    echo "edgeproxy is running and up to date"
  fi
else
  echo "next: put provider keys in /etc/edgeproxy/env, review /etc/edgeproxy/relay.yaml, then"
  echo "  sudo systemctl enable --now edgeproxy"
  echo "  sudo edgeproxy keys create alice"
fi
