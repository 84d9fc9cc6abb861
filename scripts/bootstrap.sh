# Sourced by scripts/demo, scripts/test and scripts/bench: installs what is missing, once.
#   - Debian packages: fuse3 and libfuse3-dev (pyfuse3 builds against them), pkg-config,
#     attr (getfattr/setfattr), rsync, gcc and Python headers for the build; and the tools
#     the tests drive on a mount: qemu-utils, fio, e2fsprogs (mkfs.ext4), restic, and
#     util-linux's fallocate/losetup; and postgresql, whose initdb and pg_ctl the tests' pg_server
#     fixture runs (a region index on PostgreSQL, issue 19);
#   - a virtualenv in .venv with snapfs and its test tools, refreshed when pyproject changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_apt=()
for pkg in fuse3 libfuse3-dev pkg-config attr rsync gcc qemu-utils fio e2fsprogs restic \
  util-linux mount; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need_apt+=("$pkg")
done
# Debian keeps the server's programs in /usr/lib/postgresql/NN/bin, off PATH; look there.
# (tests/conftest.py finds them the same way.)
pg_found=""
for pg_bin in /usr/lib/postgresql/*/bin; do
  if [ -x "$pg_bin/initdb" ] && [ -x "$pg_bin/pg_ctl" ]; then pg_found="$pg_bin"; fi
done
[ -n "$pg_found" ] || need_apt+=(postgresql)
if ! "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  need_apt+=(python3-dev)
fi
if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  need_apt+=(python3-venv)
fi
if ((${#need_apt[@]})); then
  say "installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

"$PYTHON" - <<'PY' || { echo "snapfs needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(sys.version_info < (3, 11))
PY

stamp="$VENV/.snapfs-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "setting up $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$ROOT[test]"
  echo "$want" > "$stamp"
fi

if [ ! -c /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
  [ -c /dev/fuse ] || { echo "snapfs needs /dev/fuse (load the fuse module)" >&2; exit 1; }
fi

export PATH="$VENV/bin:$PATH"
