"""PyTorch's GFLOP/s on the products `cargo bench -p rlhf-model --bench speed -- gemm` times:
forward x·W, dX = g·Wᵀ, dW = xᵀ·g for m = 1024 rows, W [k, n] row-major; best of 5 × 5 calls.
Run with the scratch venv's python; threads = the number of CPUs, as in our bench."""
import os
import time

import torch

torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count())))
M = 8 * 128
SHAPES = [(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 8192), (512, 2048), (2048, 512)]


def rate(f, flops):
    f()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(5):
            f()
        best = min(best, (time.perf_counter() - t) / 5)
    return flops / best / 1e9


for k, n in SHAPES:
    x = torch.rand(M, k)
    w = torch.rand(k, n)
    g = torch.rand(M, n)
    y = torch.empty(M, n)
    dx = torch.empty(M, k)
    dw = torch.empty(k, n)
    fl = 2 * M * k * n
    a = rate(lambda: torch.matmul(x, w, out=y), fl)
    b = rate(lambda: torch.matmul(g, w.t(), out=dx), fl)
    c = rate(lambda: torch.matmul(x.t(), g, out=dw), fl)
    print(f"RESULT gemm m={M} k={k} n={n} fwd={a:.0f} dx={b:.0f} dw={c:.0f}")
    # Scaling: the forward product on one thread and on all, alternating (best of 7 x 5 each).
    nt = torch.get_num_threads(); best = {1: float("inf"), nt: float("inf")}
    for _ in range(7):
        for th in (1, nt):
            torch.set_num_threads(th); t = time.perf_counter()
            for _ in range(5): torch.matmul(x, w, out=y)
            best[th] = min(best[th], (time.perf_counter() - t) / 5)
    torch.set_num_threads(nt)
    print(f"RESULT gemm-threads m={M} k={k} n={n} fwd_1thread={fl / best[1] / 1e9:.0f} "
          f"fwd_{nt}threads={fl / best[nt] / 1e9:.0f} scaling={best[1] / best[nt]:.2f}")
