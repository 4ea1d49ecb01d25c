"""PyTorch side of the CPU speed comparison: the same shapes as
`cargo bench -p rlhf-model --bench speed -- SHAPE [MODE]`, same batch (8 x 128), same token ids
(the LCG), AdamW, 2 threads. Prints RESULT lines in the same format.

    /tmp/torchvenv/bin/python scripts/torch_bench.py SHAPE [MODE]     # MODE 1 train, 2 greedy gen, 8 sampled gen (bits add)
    AUTOCAST=bf16 ... scripts/torch_bench.py SHAPE 1                    # training under autocast(bfloat16)
    LORA=8 ... scripts/torch_bench.py SHAPE 1                           # LoRA r 8 on every block linear

For the GPT-2 shapes this is the model of /work/shared/bench/torch_gpt_baseline.py (tanh-GELU,
tied head, scaled_dot_product_attention); the Llama shapes add RMSNorm, rotate-half RoPE, GQA
and SwiGLU. Run it next to ours in the same session (scripts/bench_compare.sh does).
"""
import math, os, resource, statistics, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

torch.set_num_threads(2); torch.manual_seed(0)
SHAPES = {  # name: (arch, vocab, layers, d, heads, kv_heads, inner)
    "gpt2-v50k": ("gpt2", 50257, 4, 256, 4, 4, 1024),
    "gpt2-v8k": ("gpt2", 8192, 4, 256, 4, 4, 1024),
    "gpt2-d512": ("gpt2", 8192, 6, 512, 8, 8, 2048),
    "llama-d256": ("llama", 8192, 4, 256, 4, 2, 704),
    "llama-d512": ("llama", 32000, 6, 512, 8, 4, 1376),
    "smollm2-135m": ("llama", 49152, 30, 576, 9, 3, 1536),  # SmolLM2-135M's configuration
}
name = sys.argv[1] if len(sys.argv) > 1 else "gpt2-v50k"
# AUTOCAST=bf16: the training step under torch.autocast(bfloat16) (matmuls in BF16 through oneDNN, on AMX or AVX512-BF16),
# the counterpart of our RLHF_MATMUL=bf16.
AUTOCAST = os.environ.get("AUTOCAST") == "bf16"
G = int(os.environ.get("GEN_ROWS", "8"))  # sequences decoded together (PPO decodes its rollout batch)
mode = int(sys.argv[2]) if len(sys.argv) > 2 else 3
# LORA=r: the counterpart of our RLHF_BENCH_LORA=r: PEFT-style adapters (rank r, alpha 2r,
# dropout 0.05) on every linear of the blocks, everything else frozen. A Llama block's q/k/v is
# one linear here, so it gets one adapter where ours has three (a few r-wide products more).
LORA = int(os.environ.get("LORA", "0"))
ARCH, V, NL, C, NH, NKV, INNER = SHAPES[name]
HD, B, T, NPOS = C // NH, 8, 128, 1024


class RMSNorm(nn.Module):
    def __init__(s, d, eps=1e-5):
        super().__init__(); s.w, s.eps = nn.Parameter(torch.ones(d)), eps
    def forward(s, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.eps) * s.w


def rope(x, pos):  # x [b, h, t, hd], rotate-half
    inv = 1.0 / (10000.0 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
    f = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([f.sin(), f.sin()], -1)
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(s):
        super().__init__()
        if ARCH == "gpt2":
            s.ln1, s.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
            s.attn, s.fc, s.fc2 = nn.Linear(C, 3 * C), nn.Linear(C, INNER), nn.Linear(INNER, C)
        else:
            s.ln1, s.ln2 = RMSNorm(C), RMSNorm(C)
            s.attn = nn.Linear(C, (NH + 2 * NKV) * HD, bias=False)
            s.gate, s.up = nn.Linear(C, INNER, bias=False), nn.Linear(C, INNER, bias=False)
            s.fc2 = nn.Linear(INNER, C, bias=False)
        s.proj = nn.Linear(C, C, bias=ARCH == "gpt2")

    def forward(s, x, pos, cache=None, li=0):
        b, t, _ = x.shape
        qkv = s.attn(s.ln1(x))
        q, k, v = qkv.split([NH * HD, NKV * HD, NKV * HD], -1)
        q = q.view(b, t, NH, HD).transpose(1, 2)
        k = k.view(b, t, NKV, HD).transpose(1, 2)
        v = v.view(b, t, NKV, HD).transpose(1, 2)
        if ARCH == "llama":
            q, k = rope(q, pos), rope(k, pos)
        if cache is not None:
            if cache[li] is not None:
                k = torch.cat([cache[li][0], k], 2); v = torch.cat([cache[li][1], v], 2)
            cache[li] = (k, v)
        if NKV != NH:
            k = k.repeat_interleave(NH // NKV, 1); v = v.repeat_interleave(NH // NKV, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=(t > 1))
        x = x + s.proj(y.transpose(1, 2).reshape(b, t, C))
        h = s.ln2(x)
        if ARCH == "gpt2":
            return x + s.fc2(F.gelu(s.fc(h), approximate="tanh"))
        return x + s.fc2(F.silu(s.gate(h)) * s.up(h))


class LM(nn.Module):
    def __init__(s):
        super().__init__()
        s.wte = nn.Embedding(V, C)
        s.wpe = nn.Embedding(NPOS, C) if ARCH == "gpt2" else None
        s.blocks = nn.ModuleList([Block() for _ in range(NL)])
        s.lnf = nn.LayerNorm(C) if ARCH == "gpt2" else RMSNorm(C)
        for n, p in s.named_parameters():
            if p.dim() == 2: nn.init.normal_(p, 0, 0.02)

    def hidden(s, idx, off=0, cache=None):
        pos = torch.arange(off, off + idx.shape[1])
        x = s.wte(idx)
        if s.wpe is not None: x = x + s.wpe(pos)
        for i, bl in enumerate(s.blocks): x = bl(x, pos, cache, i)
        return s.lnf(x)

    def logits(s, h): return h @ s.wte.weight.t()


class LoraLinear(nn.Module):
    """base(x) + scale · B(A(dropout(x))), as PEFT's lora.Linear: base frozen, A and B trained."""
    def __init__(s, base, r):
        super().__init__()
        s.base, s.scale = base, 2.0
        s.a = nn.Linear(base.in_features, r, bias=False)
        s.b = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(s.a.weight, 0, 0.02); nn.init.normal_(s.b.weight, 0, 0.02)
        s.drop = nn.Dropout(0.05)
    def forward(s, x):
        return s.base(x) + s.b(s.a(s.drop(x))) * s.scale


def add_lora(m, r):
    for p in m.parameters(): p.requires_grad_(False)
    for bl in m.blocks:
        for n, c in list(bl.named_children()):
            if isinstance(c, nn.Linear): setattr(bl, n, LoraLinear(c, r))


def lcg(n, seed):
    out, s = [], seed
    for _ in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) % (1 << 64); out.append((s >> 33) % V)
    return torch.tensor(out)


def rss_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


m = LM(); nparams = sum(p.numel() for p in m.parameters())
if LORA: add_lora(m, LORA)
print(f"torch {torch.__version__} {name} threads={torch.get_num_threads()} vocab={V} params={nparams} lora={LORA}")
if mode & 1:
    allt = lcg(B * (T + 1), 42).view(B, T + 1); x, y = allt[:, :-1], allt[:, 1:].reshape(-1)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    m.train()
    times, losses = [], []
    for step in range(13):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST):
            loss = F.cross_entropy(m.logits(m.hidden(x)).view(-1, V).float(), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        l = loss.item(); dt = time.perf_counter() - t0
        if 2 <= step < 12: times.append(dt)
        losses.append(l)
    med = statistics.median(times); toks = B * T
    print(f"RESULT train median_step={med:.4f}s tok/s={toks/med:.0f} GFLOP/s(6N)={6*nparams*toks/med/1e9:.1f} loss0={losses[0]:.3f} peak_rss_MB={rss_mb():.0f}")
for bit, label in ((2, "gen64"), (8, "gen64-sample")):
    if not mode & bit: continue
    torch.manual_seed(1)
    m.eval(); prompt = lcg(G * 64, 7).view(G, 64); best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter(); seq = prompt; nxt_in = prompt; cache = [None] * NL; off = 0
            for _ in range(64):
                h = m.hidden(nxt_in, off, cache)
                lg = m.logits(h[:, -1])
                nxt = lg.argmax(-1, keepdim=True) if bit == 2 else torch.multinomial(torch.softmax(lg, -1), 1)
                off += nxt_in.shape[1]; seq = torch.cat([seq, nxt], 1); nxt_in = nxt
            best = min(best, time.perf_counter() - t0)
    print(f"RESULT {label} kv_cache=True rows={G} time={best:.3f}s new_tok/s={G*64/best:.0f} first-row-tokens={seq[0,64:70].tolist()} peak_rss_MB={rss_mb():.0f}")
