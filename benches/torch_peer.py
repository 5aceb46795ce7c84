"""The PyTorch peer of `sweep bench`, for timings taken on the same GPU in the same session.

Each configuration is the model `sweep` builds for the matching bench cell, built from the
project's one PyTorch implementation, runner/src/export/modeling_sweep.py (the file `sweep
export` ships; its docstring states the equations and init): bf16 autocast over f32 weights,
SDPA attention (GQA without widening K/V), coefficients of Hc/Mhc in f32, global-norm
clipping at 1.0.

    python3 benches/torch_peer.py --config gpt2              # sweeps/bench-gpt2.ron, PreNorm
    python3 benches/torch_peer.py --config gpt2-mhc          # sweeps/bench-gpt2.ron, Mhc(4)
    python3 benches/torch_peer.py --config baseline          # sweeps/bench-1b.ron, cell 0
    python3 benches/torch_peer.py --config goedel            # cell 1 (AdamW)
    python3 benches/torch_peer.py --config goedel-normuon    # cell 2 (NorMuon)
    python3 benches/torch_peer.py --config d384              # sweeps/bench-d384.ron, PreNorm
    python3 benches/torch_peer.py --config d384-hc|d384-hc-dynamic|d384-mhc   # its other rows
    ... [--compile] [--steps 20] [--warmup 5] [--batch B] [--seq T] [--layers L] [--profile]

- Configurations: gpt2 (12 x 768, 12 heads, QK-norm, Gelu), gpt2-mhc (the same with Mhc(4)),
  baseline (24 x 2048, Gqa 16/4, SwiGlu, PreNorm), goedel (GatedGqa elementwise, Relu2,
  Mhc(4)), goedel-normuon (goedel trained with NorMuon), d384 (6 x 384, Mha of 6 heads,
  SwiGlu, bytes) with PreNorm, Hc (static or dynamic) or Mhc(4).
- AdamW (fused); NorMuon: Nesterov momentum 0.95, 5 Newton-Schulz rounds in bf16 batched
  over the hidden matrices of one shape, per-row second moment (beta2 0.95) and rescale to
  the orthogonalized update's norm, shape scale max(1, rows/cols)^0.5; AdamW for the rest.

Prints tokens/s, MFU (6 N + 12 L d T FLOPs per token against 989 TFLOP/s), the median step
time and the peak memory PyTorch allocated. Random tokens: throughput does not depend on them.
`--profile` then prints one more step's CUDA kernels by time (torch.profiler), to set beside
sweep's kernels under ncu (BENCHMARKS.md).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runner", "src", "export"))
from modeling_sweep import SweepConfig, SweepForCausalLM  # noqa: E402

GPT2_VOCAB = 50304

CONFIGS = {
    # name: (layers, d_model, heads, kv_heads, qk_norm, gated, ffn, residual, optimizer,
    #        batch, seq, vocab)
    "gpt2": (12, 768, 12, 12, True, False, "Gelu", "PreNorm", "adamw", 16, 1024, GPT2_VOCAB),
    "gpt2-mhc": (12, 768, 12, 12, True, False, "Gelu", "Mhc", "adamw", 16, 1024, GPT2_VOCAB),
    "baseline": (24, 2048, 16, 4, False, False, "SwiGlu", "PreNorm", "adamw", 8, 1024, GPT2_VOCAB),
    "goedel": (24, 2048, 16, 4, False, True, "Relu2", "Mhc", "adamw", 8, 1024, GPT2_VOCAB),
    "goedel-normuon": (24, 2048, 16, 4, False, True, "Relu2", "Mhc", "normuon", 8, 1024, GPT2_VOCAB),
    # sweeps/bench-d384.ron: 6 x 384, Mha with 6 heads of 64, SwiGlu, bytes, batch 32 x 256.
    "d384": (6, 384, 6, 6, False, False, "SwiGlu", "PreNorm", "adamw", 32, 256, 256),
    "d384-hc": (6, 384, 6, 6, False, False, "SwiGlu", "Hc", "adamw", 32, 256, 256),
    "d384-hc-dynamic": (6, 384, 6, 6, False, False, "SwiGlu", "HcDynamic", "adamw", 32, 256, 256),
    "d384-mhc": (6, 384, 6, 6, False, False, "SwiGlu", "Mhc", "adamw", 32, 256, 256),
}

# The residual spec of each name above, as the sweep files write them (4 streams).
RESIDUALS = {
    "PreNorm": {"kind": "PreNorm"},
    "Hc": {"kind": "Hc", "streams": 4, "dynamic": False},
    "HcDynamic": {"kind": "Hc", "streams": 4, "dynamic": True},
    "Mhc": {"kind": "Mhc", "streams": 4, "sinkhorn_iters": 20},
}


def model_config(cfg, seq):
    """The SweepConfig of a bench configuration (the sizes sweep's components resolve to)."""
    layers, d, heads, kv, qk_norm, gated, ffn, residual = cfg[:8]
    # Hidden widths as ffn/mod.rs rounds them: SwiGlu 8/3 d, Gelu and Relu2 4 d.
    mult = 8 / 3 if ffn == "SwiGlu" else 4.0
    hidden = max(1, int(mult * d / 8 + 0.5)) * 8
    attention = {
        "kind": "GatedGqa" if gated else "Gqa",
        "heads": heads,
        "kv_heads": kv,
        "rope": True,
        "rope_theta": 10000.0,
        "qk_norm": qk_norm,
        "gate": "Elementwise",
    }
    return SweepConfig(
        vocab_size=cfg[11],
        d_model=d,
        n_layers=layers,
        seq_len=seq,
        attention=attention,
        ffn={"kind": ffn, "hidden": hidden},
        residual=RESIDUALS[residual],
    )


def loss_of(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.view(-1))

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
    ap.add_argument("--profile", action="store_true", help="after timing, print one step's CUDA kernels by time")
    a = ap.parse_args()
    cfg = list(CONFIGS[a.config])
    if a.layers:
        cfg[0] = a.layers
    b, t = a.batch or cfg[9], a.seq or cfg[10]
    torch.manual_seed(0)
    model = SweepForCausalLM(model_config(cfg, t)).cuda()
    n = sum(p.numel() for p in model.parameters())
    hidden = model.hidden_matrices()
    if cfg[8] == "normuon":
        ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if id(p) not in ids]
        opts = [
            NorMuon(hidden),
            torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True),
        ]
    else:
        opts = [torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), fused=True)]
    step_fn = torch.compile(loss_of) if a.compile else loss_of
    vocab = cfg[11]
    x = torch.randint(0, vocab, (b, t), device="cuda")
    y = torch.randint(0, vocab, (b, t), device="cuda")
    times = []

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        return loss

    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = train_step()
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
    if a.profile:
        # One more step under the profiler: the kernels sweep's own profile is set against.
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            train_step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))


if __name__ == "__main__":
    main()
