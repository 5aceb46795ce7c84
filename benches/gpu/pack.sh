#!/usr/bin/env bash
# Packs what a measurement on the GPU machine needs into .gpu/ (ignored) at the repository's
# root, from a CUDA build made here:
#
#   source ../shared/cuda/setup.sh
#   cargo build --release --features cuda && cargo test --release --features cuda -p components --no-run
#   bash benches/gpu/pack.sh [--gutenberg]
#
# then, through the device tool, with `.gpu` carried: `bash benches/gpu/measure.sh [PARTS]`.
# It holds the sweep binary and the components' test binary (xz), the commit they were built
# at, copies of the data the measurements read (../shared does not travel), the flash-check
# sweep, and the CPU reference runs a previous lease left in .gpu/ref/ (measure.sh makes them
# when they are missing; copy them from the files that come back into .gpu/ref/ to keep them).
# --gutenberg adds a training shard, WikiText-2 and the four benchmarks for the `gutenberg`
# part (about 11 MB more); the whole folder stays under the 64 MiB a call may carry.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
shared=../shared
out=.gpu
mkdir -p "$out/ref"
# The CUDA build's test binary, as cargo names it (a CPU build's would hold no GPU test).
tests=$(cargo test --release --features cuda -p components --no-run --message-format=json \
    2>/dev/null | python3 -c 'import json, sys
paths = [m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")]
print(paths[-1] if paths else "")' || true)
if [ ! -x target/release/sweep ] || [ -z "$tests" ]; then
    echo "pack.sh: build first (see the header): target/release/sweep or the components test binary is missing" >&2
    exit 2
fi
# A binary older than its sources would be measured under the wrong commit.
for bin in target/release/sweep "$tests"; do
    newer=$(find components registry runner Cargo.toml Cargo.lock -newer "$bin" -type f \
        \( -name '*.rs' -o -name '*.cu' -o -name '*.cuh' -o -name 'Cargo.*' \) | head -1)
    if [ -n "$newer" ]; then
        echo "pack.sh: $newer is newer than $bin; rebuild (see the header)" >&2
        exit 2
    fi
done
commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- components registry runner || commit="$commit+uncommitted"
echo "$commit" > "$out/COMMIT"
xz -T2 -3 -c target/release/sweep > "$out/sweep.xz"
xz -T2 -3 -c "$tests" > "$out/tests.xz"
cp -f "$shared/cuda/run-on-gpu.sh" "$shared/data/tinyshakespeare/input.txt" benches/gpu/flash-check.ron "$out/"
[ -f "$out/val.txt.xz" ] || xz -T2 -3 -c "$shared/data/gutenberg/val.txt" > "$out/val.txt.xz"
if [ "${1:-}" = "--gutenberg" ]; then
    [ -f "$out/train-00.txt.xz" ] || xz -T2 -3 -c "$shared/data/gutenberg/train-00.txt" > "$out/train-00.txt.xz"
    tmp=$(mktemp -d)
    mkdir "$tmp/eval"
    cp "$shared"/data/eval/{hellaswag_val,arc_easy,arc_challenge,winogrande}.jsonl "$tmp/eval/"
    cp "$shared/data/wikitext-2/test.txt" "$tmp/wikitext2.txt"
    tar -C "$tmp" -cJf "$out/eval.tar.xz" eval wikitext2.txt
    rm -rf "$tmp"
else
    rm -f "$out/train-00.txt.xz" "$out/eval.tar.xz"
fi
echo "packed $commit into $out ($(du -sh "$out" | cut -f1))"
