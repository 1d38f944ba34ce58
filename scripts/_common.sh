# Shared by scripts/run-napari.sh and scripts/test.sh: system packages, the .venv, the editable install.
# Works on a fresh Debian/Ubuntu machine with nothing but Python 3.10+ installed.

# Debian packages Qt 6 and napari's OpenGL canvas need (software GL through Mesa where there is no GPU).
RUNTIME_DEBS="libgl1 libegl1 libgl1-mesa-dri libglib2.0-0 libfontconfig1 libdbus-1-3 libxkbcommon-x11-0
  libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0 libxcb-randr0
  libxcb-shape0 libxcb-xfixes0 libxcb-xkb1"
# ... and what the Qt tests add: a virtual X server.
TEST_DEBS="xvfb xauth"

PYTHON=${PYTHON:-python3}

say() { printf '\033[1m[nucsynth]\033[0m %s\n' "$*" >&2; }

ensure_debs() {
  # Install the given Debian packages where missing (apt-get, as root or through sudo).
  local missing=() p
  command -v dpkg-query >/dev/null 2>&1 || { say "not a Debian/Ubuntu system: make sure these are installed: $*"; return 0; }
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { say "please install as root: apt-get install ${missing[*]}"; return 1; }
    sudo="sudo"
  fi
  say "installing Debian packages: ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
  # Create .venv at the repository root (with python3-venv from apt where Debian's Python lacks ensurepip).
  if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
      rm -rf .venv
      local ver
      ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      ensure_debs "python${ver}-venv" || ensure_debs python3-venv
      "$PYTHON" -m venv .venv
    fi
    say "created .venv"
  fi
}

pip_install() {
  # Install the project (editable) with the given extras; quiet unless something fails.
  say "installing napari-nucsynth[$1] into .venv (the first time takes a few minutes: torch is large)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$1]"
}
