#!/usr/bin/env bash
# Fetch, verify (MD5) and unpack Clotho v2.1 into $DATA_DIR/clotho_v2; safe to rerun or interrupt.
# Environment: DATA_DIR, CLOTHO_BASE_URL (mirror), CLOTHO_CHECKSUMS (manifest); arguments: see --help.
set -euo pipefail
cd "$(dirname "$0")/.."
python=".venv/bin/python"
[ -x "$python" ] || python=python3
exec "$python" -m data_loaders.download_clotho "$@"
