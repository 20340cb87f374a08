#!/usr/bin/env bash
# Install the reference implementation (PyPI chatterbox-tts==0.1.7) in its OWN virtual environment.
# Its pinned stack (numpy<2, transformers 5.2, diffusers 0.29, librosa 0.11, old setuptools) must never leak into
# the project's environment. Recipe: ../shared/oracle/README.md. Idempotent: a finished venv is kept.
#
# usage: tests/reference/setup_oracle.sh [VENV_DIR]    (default: $CHATTERBOX_FAST_ORACLE_DIR/venv)
set -euo pipefail
root="${CHATTERBOX_FAST_ORACLE_DIR:-$HOME/.cache/chatterbox-fast/oracle}"
venv="${1:-$root/venv}"
stamp="$venv/.chatterbox-oracle-ok"
if [ -f "$stamp" ]; then
  echo "oracle venv ready: $venv"
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
"$pip" install -q torch==2.13.0
dl=$(mktemp -d)
"$pip" download -q --no-deps -d "$dl" chatterbox-tts==0.1.7
"$pip" install -q --no-deps "$dl"/chatterbox_tts-0.1.7-py3-none-any.whl
"$pip" install -q torch==2.13.0 'numpy>=1.24,<2' librosa==0.11.0 s3tokenizer transformers==5.2.0 \
    diffusers==0.29.0 'resemble-perth>=1.0.0' conformer==0.3.2 safetensors==0.5.3 omegaconf pyloudnorm soundfile
"$pip" install -q 'setuptools<81'
# Trap 1: the registry's torchaudio is a CUDA build whose compiled extension cannot load beside the CPU torch.
# The reference only needs its pure-Python parts (transforms.Resample, compliance.kaldi.fbank).
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d "$site/torchaudio/lib" ]; then
  mkdir -p "$site/torchaudio/lib.disabled"
  find "$site/torchaudio/lib" -maxdepth 1 -name '*.so' -exec mv {} "$site/torchaudio/lib.disabled/" \;
fi
"$venv/bin/python" - <<'PY'
import torchaudio, perth  # noqa: F401
from chatterbox.tts import ChatterboxTTS  # noqa: F401
assert perth.PerthImplicitWatermarker is not None, "resemble-perth failed to import (setuptools>=81?)"
print("oracle imports ok")
PY
rm -rf "$dl"
touch "$stamp"
echo "oracle venv ready: $venv"
