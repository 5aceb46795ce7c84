"""A second implementation of `sweep eval`'s zero-shot scoring, for the plain baseline stack
(Gqa + SwiGlu + PreNorm, RoPE, tied embeddings): numpy in float64, written from the model's
equations, not from sweep's code paths. It reads the benchmark JSONL files itself and builds
each prompt the lm-evaluation-harness way, checks that sweep built the same text, scores the
token ids sweep dumped (the same GPT-2 tokenizer), and compares every item's choice (acc and
acc_norm) and the accuracies with sweep's.

    sweep eval --db DB --trial ID --benchmarks "[HellaSwag(limit: 200), ArcEasy(limit: 200)]" \
        --benchmark-dir ../shared/data/eval --dump items.jsonl
    python3 benches/score_check.py --weights DB.checkpoints/ID/final.safetensors \
        --items items.jsonl --eval-dir ../shared/data/eval --heads 4 --kv-heads 2 --seq-len 128

Needs numpy and safetensors (pip install numpy safetensors).
"""

import argparse
import json
import sys

import numpy as np
from safetensors.numpy import load_file

EPS = 1e-6
FILES = {"hellaswag": "hellaswag_val.jsonl", "arc_easy": "arc_easy.jsonl",
         "arc_challenge": "arc_challenge.jsonl", "piqa": "piqa.jsonl",
         "openbook_qa": "openbook_qa.jsonl", "copa": "copa.jsonl", "boolq": "boolq.jsonl"}
ANSWER = {"arc_easy", "arc_challenge", "boolq"}


def rms_norm(x, gain):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * gain


def rope(x, theta=10000.0):
    # Rotate-half layout: channel i pairs with i + hd/2, frequency theta^(-i/half).
    t, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    freq = theta ** (-(np.arange(hd) % half) / half)
    ang = np.arange(t)[:, None] * freq[None, :]
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * np.cos(ang) + rot * np.sin(ang)


def forward(w, ids, heads, kv_heads):
    """Logits (T, V) of one sequence."""
    x = w["wte"][ids]
    c = x.shape[1]
    hd = c // heads
    t = len(ids)
    mask = np.triu(np.full((t, t), -np.inf), 1)
    layer = 0
    while f"blocks.{layer}.attn.q.weight" in w:
        p = f"blocks.{layer}."
        h = rms_norm(x, w[p + "attn_norm.gain"])
        q = (h @ w[p + "attn.q.weight"].T).reshape(t, heads, hd).transpose(1, 0, 2)
        k = (h @ w[p + "attn.k.weight"].T).reshape(t, kv_heads, hd).transpose(1, 0, 2)
        v = (h @ w[p + "attn.v.weight"].T).reshape(t, kv_heads, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        rep = heads // kv_heads
        k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        y = (s @ v).transpose(1, 0, 2).reshape(t, c)
        x = x + y @ w[p + "attn.o.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.gain"])
        g = h @ w[p + "ffn.gate.weight"].T
        u = h @ w[p + "ffn.up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn.down.weight"].T
        layer += 1
    return rms_norm(x, w["norm_f.gain"]) @ w["wte"].T


def logprob(w, tokens, cont, seq_len, heads, kv_heads):
    tokens = tokens[-(seq_len + 1):]
    inp, tgt = tokens[:-1], tokens[1:]
    logits = forward(w, np.array(inp), heads, kv_heads)
    z = logits - logits.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    n = len(inp)
    return sum(lp[p, tgt[p]] for p in range(n - min(cont, n), n))


def prompts(task, doc):
    """(context, continuation) pairs and the choices' bytes, as the harness builds them."""
    if task == "winogrande":
        return [(o, " " + doc["continuation"]) for o in doc["context_options"]], None
    ctx = doc["query"] + ("\nAnswer:" if task in ANSWER else "")
    return [(ctx, " " + c) for c in doc["choices"]], [len(c.encode()) for c in doc["choices"]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--items", required=True)
    ap.add_argument("--eval-dir", required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    a = ap.parse_args()
    w = {k: v.astype(np.float64) for k, v in load_file(a.weights).items()}
    items = [json.loads(l) for l in open(a.items)]
    docs = {}
    per_task = {}
    worst = 0.0
    for it in items:
        task = it["task"]
        if task not in docs:
            lines = open(f"{a.eval_dir}/{FILES.get(task, task + '.jsonl')}").read().splitlines()
            docs[task] = lines
        doc = json.loads(docs[task][it["line"] - 1])
        pairs, nbytes = prompts(task, doc)
        # sweep moves a context's trailing whitespace into the continuation, as the harness does.
        mine = [(c.rstrip(), c[len(c.rstrip()):] + x) for c, x in pairs]
        theirs = [(c.rstrip(), c[len(c.rstrip()):] + x) for c, x in it["prompts"]]
        assert mine == theirs, (task, it["line"], mine, theirs)
        assert doc["gold"] == it["gold"]
        lps = [logprob(w, t, n, a.seq_len, a.heads, a.kv_heads) for t, n in zip(it["tokens"], it["cont"])]
        worst = max(worst, max(abs(x - y) for x, y in zip(lps, it["logprob"])))
        acc = int(np.argmax(lps))
        norm = int(np.argmax([x / b for x, b in zip(lps, nbytes)])) if nbytes else None
        t = per_task.setdefault(task, {"n": 0, "acc": 0, "norm": 0, "acc_same": 0, "norm_same": 0,
                                       "sweep_acc": 0, "sweep_norm": 0})
        t["n"] += 1
        t["acc"] += acc == doc["gold"]
        t["norm"] += norm == doc["gold"]
        t["acc_same"] += acc == it["acc_choice"]
        t["norm_same"] += norm == it["norm_choice"]
        t["sweep_acc"] += it["acc_choice"] == doc["gold"]
        t["sweep_norm"] += it["norm_choice"] == doc["gold"]
    ok = True
    print("| task | items | acc (numpy / sweep) | acc_norm (numpy / sweep) | same acc choice | same acc_norm choice |")
    print("|---|---|---|---|---|---|")
    for task, t in per_task.items():
        n = t["n"]
        print(f"| {task} | {n} | {t['acc'] / n:.4f} / {t['sweep_acc'] / n:.4f} | "
              f"{t['norm'] / n:.4f} / {t['sweep_norm'] / n:.4f} | {t['acc_same']}/{n} | {t['norm_same']}/{n} |")
        ok &= t["acc_same"] == n and t["norm_same"] == n
    print(f"largest log-likelihood difference (sweep f32 - numpy f64): {worst:.2e} nats")
    print("every choice agrees" if ok else "CHOICES DIFFER")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
