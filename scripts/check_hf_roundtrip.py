"""Show that transformers loads checkpoints written by rlhf with the same logits.

For each reference fixture: rlhf loads it and saves it again (examples/resave.rs), then
transformers loads both the original and rlhf's copy and compares logits on random ids.
Run in a scratch venv with torch + transformers:
    python scripts/check_hf_roundtrip.py
"""
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
worst = 0.0
for name in ["gpt2", "llama", "qwen2"]:
    src = os.path.join(root, "crates/rlhf-model/tests/fixtures", name)
    dst = tempfile.mkdtemp(prefix=f"rlhf-roundtrip-{name}-")
    subprocess.run(["cargo", "run", "-q", "-p", "rlhf-model", "--example", "resave", "--", src, dst],
                   cwd=root, check=True)
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(dst).eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = (a(ids).logits - b(ids).logits).abs().max().item()
    worst = max(worst, d)
    print(f"{name}: transformers loads rlhf's checkpoint; max |logit difference| = {d:.3g}")
sys.exit(0 if worst < 1e-5 else 1)
