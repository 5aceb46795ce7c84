"""The PyTorch peer of `sweep bench sweeps/bench-gpt2.ron` (PreNorm cell), for timings taken
on the same GPU in the same session: GPT-2 small with RMSNorm, RoPE, QK-norm, GELU MLP, tied
embeddings, vocab 50304, bf16 autocast over f32 weights, fused AdamW, SDPA attention.

    python3 benches/torch_peer.py [--compile] [--steps 20] [--warmup 5]

Prints tokens/s, MFU (6 N + 12 L d T FLOPs per token against 989 TFLOP/s), the median step
time and the peak memory PyTorch allocated. Random tokens: throughput does not depend on them.
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

V, L, D, H, B, T = 50304, 12, 768, 12, 16, 1024


def rms(x, eps=1e-6):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rms(x) * self.gain


def rope_tables(hd, t, theta=10000.0):
    freq = theta ** (-torch.arange(0, hd // 2).float() / (hd // 2))
    ang = torch.arange(t).float()[:, None] * freq[None, :]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def rotate(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = Norm(D), Norm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        self.up = nn.Linear(D, 4 * D, bias=False)
        self.down = nn.Linear(4 * D, D, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, H, D // H).permute(2, 0, 3, 1, 4)
        q, k = rotate(rms(q), cos, sin), rotate(rms(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, D))
        return x + self.down(F.gelu(self.up(self.n2(x))))


class Gpt(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.norm = Norm(D)
        cos, sin = rope_tables(D // H, T)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, idx, targets):
        x = self.wte(idx)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        logits = self.norm(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, V), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = Gpt().cuda()
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), fused=True)
    step_fn = torch.compile(model) if a.compile else model
    x = torch.randint(0, V, (B, T), device="cuda")
    y = torch.randint(0, V, (B, T), device="cuda")
    times = []
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    tps = B * T / step
    flops = 6 * n + 12 * L * D * T
    print(
        f"torch {torch.__version__} {'compile' if a.compile else 'eager'}: {n / 1e6:.1f}M params, "
        f"{tps:.0f} tokens/s, MFU {100 * flops * tps / 989e12:.1f}%, step {1e3 * step:.1f} ms, "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB ({torch.cuda.get_device_name()})"
    )


if __name__ == "__main__":
    main()
