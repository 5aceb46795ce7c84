"""PyTorch's peer of `sweep bench --attention B,H,KV,T,HD`: causal scaled_dot_product_attention
in bf16 on the same GPU, forward and backward timed apart (synchronized, median), under each
SDPA backend that takes the shape (FlashAttention-2, cuDNN, memory-efficient). TFLOP/s count
the causal half of the products, as `sweep bench` does: forward 4 B H T^2 HD / 2, backward
2.5 times that.

    python3 benches/torch_attention.py --shape 8,16,4,1024,128 --steps 20 --warmup 5
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, steps, warmup):
    out = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8,16,4,1024,128", help="B,H,KV,T,HD")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    b, h, kv, t, hd = (int(x) for x in a.shape.split(","))
    dev = "cuda"
    q = torch.randn(b, h, t, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, kv, t, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, kv, t, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(b, h, t, hd, device=dev, dtype=torch.bfloat16)
    fwd_flops = 2.0 * b * h * hd * t * t
    print(f"SDPA (B, H, KV, T, HD) = ({b}, {h}, {kv}, {t}, {hd}), bf16, causal, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}; median of {a.steps} after {a.warmup}")
    print("| backend | forward | TFLOP/s | backward | TFLOP/s |")
    print("|---|---|---|---|---|")
    for name, backend in [("FLASH_ATTENTION", SDPBackend.FLASH_ATTENTION),
                          ("CUDNN_ATTENTION", SDPBackend.CUDNN_ATTENTION),
                          ("EFFICIENT_ATTENTION", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel(backend):
                def fwd():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)

                f = timed(fwd, a.steps, a.warmup)
                holder = {}

                def bwd():
                    holder["y"].backward(dy)

                times = []
                for i in range(a.warmup + a.steps):
                    q.grad = k.grad = v.grad = None
                    holder["y"] = fwd()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    bwd()
                    torch.cuda.synchronize()
                    if i >= a.warmup:
                        times.append(time.perf_counter() - t0)
                bw = statistics.median(times)
            print(f"| {name} | {f * 1e3:.3f} ms | {fwd_flops / f / 1e12:.1f} | {bw * 1e3:.3f} ms | "
                  f"{2.5 * fwd_flops / bw / 1e12:.1f} |")
        except RuntimeError as e:
            print(f"| {name} | not available: {str(e).splitlines()[0][:80]} ||||")


if __name__ == "__main__":
    main()
