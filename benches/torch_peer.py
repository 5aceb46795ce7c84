"""The PyTorch peer of `sweep bench`, for timings taken on the same GPU in the same session.

Each configuration is the model `sweep` builds for the matching bench cell, with the
project's equations and init (components/src/...): RMSNorm (eps 1e-6, learned gain), RoPE
(rotate-half, theta 10000), tied embeddings, bf16 autocast over f32 weights, SDPA attention
(GQA without widening K/V), global-norm clipping at 1.0.

    python3 benches/torch_peer.py --config gpt2              # sweeps/bench-gpt2.ron, PreNorm
    python3 benches/torch_peer.py --config gpt2-mhc          # sweeps/bench-gpt2.ron, Mhc(4)
    python3 benches/torch_peer.py --config baseline          # sweeps/bench-1b.ron, cell 0
    python3 benches/torch_peer.py --config goedel            # cell 1 (AdamW)
    python3 benches/torch_peer.py --config goedel-normuon    # cell 2 (NorMuon)
    ... [--compile] [--steps 20] [--warmup 5] [--batch B] [--seq T] [--layers L]

- Gqa: q, k, v, o projections; GatedGqa (elementwise) multiplies the attention output by
  sigmoid(x W_g) (x the normed sublayer input) before the output projection.
- SwiGlu: down(silu(gate x) * up x), hidden round(8/3 d / 8) * 8; Relu2: down(relu(up x)^2),
  hidden 4 d; Gelu: 4 d, erf GELU.
- PreNorm: x + F(norm(x)). Mhc(n): n streams (B, T, n, C), the embedding replicated, merged
  by their mean before the final norm; per sublayer x' = rmsnorm(vec(x)) over n C values,
  [pre | post | res] = a * (x' phi) + b, H_pre = sigmoid, H_post = 2 sigmoid, H_res = 20
  Sinkhorn rounds (columns then rows) of exp(res), all in f32; new state
  H_res x + H_post F(H_pre^T x). phi = 0, a = 0.01, b_pre = +-3, b_post = 0, b_res = 6 I - 3.
- AdamW (fused); NorMuon: Nesterov momentum 0.95, 5 Newton-Schulz rounds in bf16 batched
  over the hidden matrices of one shape, per-row second moment (beta2 0.95) and rescale to
  the orthogonalized update's norm, shape scale max(1, rows/cols)^0.5; AdamW for the rest.

Prints tokens/s, MFU (6 N + 12 L d T FLOPs per token against 989 TFLOP/s), the median step
time and the peak memory PyTorch allocated. Random tokens: throughput does not depend on them.
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

V = 50304
EPS = 1e-6
INIT_STD = 0.02

CONFIGS = {
    # name: (layers, d_model, heads, kv_heads, qk_norm, gated, ffn, streams, optimizer, batch, seq)
    "gpt2": (12, 768, 12, 12, True, False, "gelu", 1, "adamw", 16, 1024),
    "gpt2-mhc": (12, 768, 12, 12, True, False, "gelu", 4, "adamw", 16, 1024),
    "baseline": (24, 2048, 16, 4, False, False, "swiglu", 1, "adamw", 8, 1024),
    "goedel": (24, 2048, 16, 4, False, True, "relu2", 4, "adamw", 8, 1024),
    "goedel-normuon": (24, 2048, 16, 4, False, True, "relu2", 4, "normuon", 8, 1024),
}


def rms(x):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS).to(x.dtype)


class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rms(x) * self.gain


def linear(i, o, std):
    lin = nn.Linear(i, o, bias=False)
    nn.init.normal_(lin.weight, std=std)
    lin.weight.hidden = True
    return lin


def rope_tables(hd, t, theta=10000.0):
    freq = theta ** (-torch.arange(0, hd // 2).float() / (hd // 2))
    ang = torch.arange(t).float()[:, None] * freq[None, :]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def rotate(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


class Attention(nn.Module):
    def __init__(self, d, heads, kv, qk_norm, gated, out_std):
        super().__init__()
        self.heads, self.kv, self.hd, self.qk_norm = heads, kv, d // heads, qk_norm
        self.q = linear(d, d, INIT_STD)
        self.k = linear(d, kv * self.hd, INIT_STD)
        self.v = linear(d, kv * self.hd, INIT_STD)
        self.o = linear(d, d, out_std)
        self.gate = linear(d, d, INIT_STD) if gated else None

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        if self.qk_norm:
            q, k = rms(q), rms(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.kv != self.heads
        )
        y = y.transpose(1, 2).reshape(b, t, d)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        return self.o(y)


class Mlp(nn.Module):
    def __init__(self, d, kind, out_std):
        super().__init__()
        self.kind = kind
        h = {"swiglu": round(8 / 3 * d / 8) * 8, "relu2": 4 * d, "gelu": 4 * d}[kind]
        self.up = linear(d, h, INIT_STD)
        self.gate = linear(d, h, INIT_STD) if kind == "swiglu" else None
        self.down = linear(h, d, out_std)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        if self.kind == "relu2":
            return self.down(F.relu(self.up(x)).square())
        return self.down(F.gelu(self.up(x)))


def sinkhorn(logits, iters):
    m = torch.exp(logits - logits.amax((-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    return m


class MhcConnection(nn.Module):
    """One sublayer's mHC coefficients (f32) and its mixing around F."""

    def __init__(self, n, d, k):
        super().__init__()
        self.n = n
        self.phi = nn.Parameter(torch.zeros(n * d, 2 * n + n * n))
        self.a = nn.Parameter(torch.full((3,), 0.01))
        self.b_pre = nn.Parameter(torch.tensor([3.0 if i == k % n else -3.0 for i in range(n)]))
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(6 * torch.eye(n) - 3)

    def forward(self, state, f):
        b, t, n, c = state.shape
        with torch.autocast("cuda", enabled=False):
            z = rms(state.float().reshape(b, t, n * c)) @ self.phi
            pre = torch.sigmoid(self.a[0] * z[..., :n] + self.b_pre)
            post = 2 * torch.sigmoid(self.a[1] * z[..., n : 2 * n] + self.b_post)
            res = sinkhorn((self.a[2] * z[..., 2 * n :]).view(b, t, n, n) + self.b_res, 20)
        dt = state.dtype
        h = torch.einsum("btn,btnc->btc", pre.to(dt), state)
        out = f(h)
        return torch.einsum("btij,btjc->btic", res.to(dt), state) + post.to(dt)[..., None] * out[:, :, None, :]


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        layers, d, heads, kv, qk_norm, gated, ffn, n = cfg[:8]
        out_std = INIT_STD / math.sqrt(2 * layers)
        self.n1, self.n2 = Norm(d), Norm(d)
        self.attn = Attention(d, heads, kv, qk_norm, gated, out_std)
        self.mlp = Mlp(d, ffn, out_std)
        self.mix = None
        if n > 1:
            self.mix = nn.ModuleList(MhcConnection(n, d, 2 * layer + i) for i in range(2))

    def forward(self, x, cos, sin):
        attn = lambda h: self.attn(self.n1(h), cos, sin)
        mlp = lambda h: self.mlp(self.n2(h))
        if self.mix is None:
            x = x + attn(x)
            return x + mlp(x)
        x = self.mix[0](x, attn)
        return self.mix[1](x, mlp)


class Gpt(nn.Module):
    def __init__(self, cfg, seq):
        super().__init__()
        layers, d, heads = cfg[0], cfg[1], cfg[2]
        self.n = cfg[7]
        self.wte = nn.Embedding(V, d)
        nn.init.normal_(self.wte.weight, std=INIT_STD)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(layers))
        self.norm = Norm(d)
        cos, sin = rope_tables(d // heads, seq)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, idx, targets):
        x = self.wte(idx)
        if self.n > 1:
            x = x[:, :, None, :].expand(-1, -1, self.n, -1).contiguous()
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        if self.n > 1:
            x = x.mean(2)
        logits = self.norm(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, V), targets.view(-1))


def newton_schulz(g, steps=5):
    """Stacked (k, rows, cols) in bf16, as Muon's reference does, on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.size(-2) > g.size(-1)
    x = g.mT if tall else g
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)).bfloat16()
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.float()
    return x.mT if tall else x


class NorMuon(torch.optim.Optimizer):
    """NorMuon over hidden matrices grouped by shape (one batched Newton-Schulz a group)."""

    def __init__(self, params, lr=0.02, momentum=0.95, beta2=0.95, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, beta2=beta2, eps=eps))
        groups = {}
        for p in self.param_groups[0]["params"]:
            groups.setdefault(tuple(p.shape), []).append(p)
        self.by_shape = list(groups.values())
        for ps in self.by_shape:
            k, (r, c) = len(ps), ps[0].shape
            self.state[ps[0]]["m"] = torch.zeros(k, r, c, device=ps[0].device)
            self.state[ps[0]]["v"] = torch.zeros(k, r, 1, device=ps[0].device)

    @torch.no_grad()
    def step(self):
        h = self.param_groups[0]
        mu, b2 = h["momentum"], h["beta2"]
        for ps in self.by_shape:
            st = self.state[ps[0]]
            g = torch.stack([p.grad for p in ps])
            st["m"].mul_(mu).add_(g)
            o = newton_schulz(g + mu * st["m"])
            st["v"].mul_(b2).add_((1 - b2) * o.square().mean(-1, keepdim=True))
            normed = o / (st["v"].sqrt() + h["eps"])
            scale = o.norm(dim=(-2, -1), keepdim=True) / normed.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
            r, c = ps[0].shape
            upd = normed * (scale * h["lr"] * max(1.0, r / c) ** 0.5)
            torch._foreach_sub_(ps, list(upd.unbind(0)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="gpt2")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--layers", type=int)
    a = ap.parse_args()
    cfg = list(CONFIGS[a.config])
    if a.layers:
        cfg[0] = a.layers
    b, t = a.batch or cfg[9], a.seq or cfg[10]
    torch.manual_seed(0)
    model = Gpt(cfg, t).cuda()
    n = sum(p.numel() for p in model.parameters())
    hidden = [p for p in model.parameters() if getattr(p, "hidden", False)]
    if cfg[8] == "normuon":
        rest = [p for p in model.parameters() if not getattr(p, "hidden", False)]
        opts = [
            NorMuon(hidden),
            torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True),
        ]
    else:
        opts = [torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), fused=True)]
    step_fn = torch.compile(model) if a.compile else model
    x = torch.randint(0, V, (b, t), device="cuda")
    y = torch.randint(0, V, (b, t), device="cuda")
    times = []
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    tps = b * t / step
    flops = 6 * n + 12 * cfg[0] * cfg[1] * t
    print(
        f"torch {torch.__version__} {a.config} {'compile' if a.compile else 'eager'}: "
        f"{n / 1e6:.1f}M params, {tps:.0f} tokens/s, MFU {100 * flops * tps / 989e12:.1f}%, "
        f"step {1e3 * step:.1f} ms, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
        f"loss {loss.item():.3f} ({torch.cuda.get_device_name()})",
        flush=True,
    )


if __name__ == "__main__":
    main()
