"""Checks `sweep export` directories with Hugging Face transformers, offline.

For each DIR:WINDOWS pair (`sweep export --trial ID --out DIR --val-windows WINDOWS`):
- loads DIR with AutoModelForCausalLM (trust_remote_code=True: stock Llama / Qwen3 exports
  need none, the others run the shipped modeling_sweep.py) and AutoTokenizer, in f32 on CPU
  (or --device);
- computes the mean cross-entropy over the trial's validation windows and compares it with
  the val/loss the trial recorded (relative difference; the target is 1e-5);
- encodes the start of the trial's corpus with the exported tokenizer and compares the ids
  with those sweep's tokenizer gave (`sample_ids`);
- greedily continues a prompt with `generate`.

    python3 benches/export_check.py out-1:win-1.safetensors out-2:win-2.safetensors ...

Prints one line per export and exits 1 if any check fails.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def windows(path):
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def check(directory, window_file, device, tol, prompt):
    model, loading = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    model = model.to(device)
    # Every weight in the file is the model's, and every parameter of the model is in it.
    names_ok = not loading["missing_keys"] and not loading["unexpected_keys"]
    if not names_ok:
        print(f"  missing {loading['missing_keys']}, unexpected {loading['unexpected_keys']}")
    model.eval()
    # transformers 5's AutoTokenizer reads config.json, whose auto_map names remote code.
    tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    tensors, meta = windows(window_file)
    x = tensors["inputs"].long().to(device)
    y = tensors["targets"].long().to(device)
    nats, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], 16):
            logits = model(input_ids=x[i : i + 16]).logits.float()
            nats += F.cross_entropy(
                logits.flatten(0, 1), y[i : i + 16].flatten(), reduction="sum"
            ).item()
            count += y[i : i + 16].numel()
    loss = nats / count
    recorded = float(meta["val_loss"])
    rel = abs(loss - recorded) / abs(recorded)
    ok = rel <= tol
    tok_ok = None
    if "sample_ids" in tensors:
        want = tensors["sample_ids"].tolist()
        got = tok(meta["sample_text"], add_special_tokens=False).input_ids
        tok_ok = got == want
        if not tok_ok:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            print(f"  tokenizer: {len(got)} ids vs {len(want)}, first difference at {first}")
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False)
    text = tok.decode(out[0][ids.shape[1] :])
    cfg = json.load(open(os.path.join(directory, "config.json")))
    print(
        f"{meta.get('trial', '?')}  {cfg['model_type']:<6}  val/loss recorded {recorded:.6f}"
        f"  transformers {loss:.6f}  rel {rel:.2e}  {'ok' if ok else 'FAIL'}"
        f"  tokenizer {'-' if tok_ok is None else ('ok' if tok_ok else 'FAIL')}"
        f"  weights {'ok' if names_ok else 'FAIL'}"
        f"  | {prompt!r} -> {text!r}"
    )
    return ok and names_ok and tok_ok is not False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pairs", nargs="+", help="DIR:WINDOWS")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--prompt", default="ROMEO:")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {args.device}")
    good = True
    for pair in args.pairs:
        directory, window_file = pair.rsplit(":", 1)
        good &= check(directory, window_file, args.device, args.tol, args.prompt)
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
