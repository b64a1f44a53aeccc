#!/usr/bin/env bash
# Build dist/edgeproxy.pyz: edgeproxy and every dependency in one file that runs with only
# `python3` on the target machine, like a Go binary:
#
#     python3 edgeproxy.pyz --version
#     python3 edgeproxy.pyz -c /etc/edgeproxy/relay.yaml serve
#
# Usage: scripts/build_pyz.sh [-o OUT] [--python-version X.Y --platform TAG]
#   -o OUT            where to write the file (default dist/edgeproxy.pyz)
#   --python-version  cross-build for another python3 (e.g. 3.12), from PyPI wheels only
#   --platform        with --python-version: the target's wheel tag (default
#                     manylinux2014_<this machine>; e.g. manylinux2014_aarch64)
#   PYTHON=...        the build interpreter (default .venv/bin/python, else python3). Without
#                     --python-version the file is for this interpreter's minor version and
#                     platform; the file refuses any other python3 with one clear line.
# Needs PyPI (or a pip cache) the first time: shiv, setuptools and the dependency wheels.
#
# Why shiv, not the stdlib zipapp: uvloop, orjson, PyYAML's C loader, aiohttp's HTTP parser,
# multidict, yarl, frozenlist and propcache are compiled extensions, and Python cannot
# import an extension module from inside a zip. shiv zips an ordinary pip-installed
# site-packages; on first run it extracts it once (under a lock, atomically) to
# $SHIV_ROOT/edgeproxy.pyz_<build hash> (default ~/.shiv; the systemd unit sets
# /var/lib/edgeproxy/.shiv, the one place ProtectSystem=strict lets it write), and every
# later start imports from that directory at normal speed. Its bootstrap is a few hundred
# lines of stdlib code. pex would work too, but it ships its own resolver runtime in every
# file and has more runtime knobs (PEX_ROOT, interpreter constraints) than a relay needs;
# shiv's cache is a plain directory an operator can inspect or delete.
#
# --extend-pythonpath lets a worker process started as `python3 -m edgeproxy` from inside
# the pyz (multi-worker mode) find the same extracted packages. --compile-pyc compiles the
# bytecode once at extraction (a few seconds, once per build), so every later start is
# fast even where Python may not write __pycache__ (PYTHONDONTWRITEBYTECODE).
set -euo pipefail
cd "$(dirname "$0")/.."

out=dist/edgeproxy.pyz
target_version=""
target_platform=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out=$2; shift 2 ;;
    --python-version) target_version=$2; shift 2 ;;
    --platform) target_platform=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_pyz.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$target_platform" ] && [ -z "$target_version" ]; then
  echo "build_pyz.sh: --platform needs --python-version" >&2
  exit 2
fi

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi

# shiv runs pip with its own interpreter, so it must live in a venv of the build python:
# the one we were given if it is a venv, else a tools venv under build/.
if ! "$py" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  tools=build/pyz-tools-$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ -x "$tools/bin/python" ] || "$py" -m venv "$tools"
  py=$tools/bin/python
fi
if ! "$py" -m shiv --version >/dev/null 2>&1; then
  echo "build_pyz.sh: installing shiv into $("$py" -c 'import sys; print(sys.prefix)')" >&2
  "$py" -m pip install -q 'shiv>=1.0,<2'
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Build the edgeproxy wheel from a copy of the sources, so the working tree gets no build/
# or egg-info churn and only what the package declares goes in.
mkdir -p "$work/src" "$work/wheels"
cp pyproject.toml README.md "$work/src/"
cp -r edgeproxy "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$py" -m pip wheel -q --no-deps -w "$work/wheels" "$work/src"
wheel=$(ls "$work/wheels"/edgeproxy-*.whl)

pip_args=("$wheel")
if [ -n "$target_version" ]; then
  machine=$("$py" -c 'import platform; print(platform.machine())')
  target_platform=${target_platform:-manylinux2014_$machine}
  pip_args+=(--only-binary=:all: --python-version "$target_version" --platform "$target_platform")
  for arch in x86_64 aarch64 armv7l ppc64le s390x i686; do
    case "$target_platform" in *"$arch") machine=$arch ;; esac
  done
  built_for="($(echo "$target_version" | tr . ,)), \"$machine\""
else
  built_for=$("$py" -c 'import platform, sys; print("(%d, %d), %r" % (*sys.version_info[:2], platform.machine()))' | tr "'" '"')
fi

# Runs inside the pyz before edgeproxy is imported: a python3 of another minor version or
# CPU cannot load the compiled extensions, so say that instead of an ImportError.
mkdir -p "$work/bin"
cat >"$work/bin/preamble.py" <<PY
# edgeproxy.pyz preamble (scripts/build_pyz.sh): shiv runs it before the entry point.
import platform
import sys

BUILT_FOR = ${built_for}
here = ((sys.version_info[0], sys.version_info[1]), platform.machine())
if here != BUILT_FOR:
    sys.stderr.write(
        "edgeproxy.pyz: built for Python %d.%d on %s, but this is Python %d.%d on %s; "
        "rebuild it for this python3 (scripts/build_pyz.sh --help)\n"
        % (*BUILT_FOR[0], BUILT_FOR[1], *here[0], here[1])
    )
    sys.exit(1)
PY

mkdir -p "$(dirname "$out")"
"$py" -m shiv \
  --entry-point edgeproxy.cli:main \
  --output-file "$out" \
  --python '/usr/bin/env python3' \
  --compressed --reproducible --extend-pythonpath --compile-pyc \
  --preamble "$work/bin/preamble.py" \
  "${pip_args[@]}" -q --disable-pip-version-check

size=$(du -h "$out" | cut -f1)
echo "built $out ($size) for Python ${target_version:-$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}" >&2
