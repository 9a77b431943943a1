#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 (jax 0.11 needs it), or fails with a clear message.
# Tries $PYTHON, python3.12 (the GPU image's), python3.13, python3, then pyenv's versions.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
candidates=("${PYTHON:-}" python3.12 python3.13 python3)
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | sort -rV); do
    candidates+=("$(pyenv root)/versions/$v/bin/python3")
  done
fi
for c in "${candidates[@]}"; do
  [ -n "$c" ] || continue
  p=$(command -v "$c" 2>/dev/null) || continue
  if ok "$p"; then echo "$p"; exit 0; fi
done
echo "recis-jax needs Python >= 3.12 (jax 0.11.2 does not support older ones). Tried: ${candidates[*]}." >&2
echo "Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
exit 1
