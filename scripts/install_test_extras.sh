#!/usr/bin/env bash
# Test-only extras for the project venv: the Perth watermarker (`watermark` extra) so the watermark tests run for real.
#
# Why a script: resemble-perth needs torchaudio (its STFT front-end uses torchaudio.transforms.Spectrogram /
# InverseSpectrogram, pure Python), librosa, pyyaml and pkg_resources (setuptools<81). On our CPU machines the only
# torchaudio the registry offers next to torch 2.13 is a CUDA build (2.11.0) whose compiled extension fails to load
# (libc10_cuda.so missing), and then `import torchaudio` fails. Moving its three .so files out of
# site-packages/torchaudio/lib/ leaves the pure-Python transforms working (same trick as the oracle venv:
# tests/reference/setup_oracle.sh). chatterbox-fast itself never imports torchaudio/librosa: only perth does, and
# only when enable_watermark=True.
#
# Idempotent and guarded: a torchaudio that already imports is left alone; nothing is moved when torchaudio is absent.
# usage: scripts/install_test_extras.sh [VENV]   (default .venv; SKIP_INSTALL=1 only applies the fix and checks)
set -euo pipefail
venv="${1:-.venv}"
py="$venv/bin/python"
repo="$(cd "$(dirname "$0")/.." && pwd)"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  "$py" -m pip install -q -e "$repo[test,watermark]"
fi

site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
lib="$site/torchaudio/lib"
if [ ! -d "$site/torchaudio" ]; then
  echo "torchaudio not installed in $venv: nothing to fix"
elif "$py" -c 'import torchaudio.transforms' 2>/dev/null; then
  echo "torchaudio imports fine in $venv: left as is"
else
  echo "torchaudio's compiled extension does not load beside this torch: disabling it (pure-Python parts stay)"
  mkdir -p "$site/torchaudio/lib.disabled"
  find "$lib" -maxdepth 1 -name '*.so' -exec mv {} "$site/torchaudio/lib.disabled/" \;
  "$py" -c 'import torchaudio.transforms' || { echo "torchaudio still fails to import" >&2; exit 1; }
fi

if "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("perth") is None)'; then
  "$py" -W "ignore:pkg_resources is deprecated:UserWarning" - <<'PY'
import perth
assert perth.PerthImplicitWatermarker is not None, (
    "resemble-perth imported but its watermarker did not (setuptools>=81 lacks pkg_resources?)")
print("perth watermarker importable")
PY
fi
