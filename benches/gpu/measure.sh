#!/usr/bin/env bash
# The standard measurement of a lease on the GPU machine, from what benches/gpu/pack.sh put
# in .gpu/ (carry [".gpu"]); run from the repository's root there:
#
#   bash benches/gpu/measure.sh [PART ...]      (default: tests checks attention 1b gpt2 d384)
#
# Parts: tests (the components' CUDA tests), checks (flash-check.ron on the GPU in f32 and
# bf16 against the CPU's f32 run, heads of 64 and 128), attention (the kernels alone at the
# three shapes of BENCHMARKS.md, beside PyTorch's SDPA), 1b (sweeps/bench-1b.ron with phases),
# gpt2, d384, peers (the torch.compile peers of the 1B baseline and of GPT-2), ncu (flash
# attention's kernels at the 1B shape: time, occupancy, stall reasons), wgmma (Hopper's
# warpgroup products against the layouts a flash attention on them would use, wgmma_probe.cu,
# compiled there), profile (every kernel of the Goedel stack's step at 2 layers, ncu's times;
# PROFILE=profile-gpt2: GPT-2 small's PreNorm, and the torch.compile peer's kernels;
# PROFILE=profile-d384: the d384 width's Mhc, with the launch counts), ncu-mhc
# (mHC's state-sized kernels under ncu's memory sections), graph (train.graph: Step against
# eager, losses and speed; GRAPH_1B=1 adds the 1B pair), gutenberg (the 1B pair trained 300 steps, pack.sh --gutenberg).
# Everything goes to $OUT/all.txt, whose tail is printed last; the CPU reference runs are
# written to $OUT/ref/ for the next lease.
set -u
G=.gpu
R="bash $G/run-on-gpu.sh"
S=/tmp/sweep
O=$OUT/all.txt
parts=${*:-tests checks attention 1b gpt2 d384}
mkdir -p "$OUT/ref"
D1="data=Text(path: \"$PWD/$G/val.txt\", tokenizer: Gpt2)"
DT="data=Text(path: \"$PWD/$G/input.txt\", tokenizer: Gpt2)"
DB="data=Text(path: \"$PWD/$G/input.txt\", tokenizer: Bytes)"
step() { echo "== $1 ($(date +%T))"; }
has() { [[ " $parts " == *" $1 "* ]]; }
{
xz -dc $G/sweep.xz > $S && chmod +x $S
xz -dc $G/tests.xz > /tmp/tests && chmod +x /tmp/tests
xz -dc $G/val.txt.xz > $G/val.txt
echo "commit $(cat $G/COMMIT); $(nvidia-smi --query-gpu=name --format=csv,noheader); parts: $parts"
# The CPU reference runs of `checks` (a few minutes on the machine's cores) beside the tests,
# and done before anything is timed.
refs=""
if has checks; then
    for d in 128 256; do
        [ -f $G/ref/flash-$d.db ] && continue
        $R $S run $G/flash-check.ron --db $G/ref/flash-$d.db --device cpu --set model.d_model=$d \
            > /tmp/cpu-$d.log 2>&1 || tail -5 /tmp/cpu-$d.log &
        refs="$refs $!"
    done
fi
if has tests; then
    step tests
    $R /tmp/tests 2>&1 | grep -E "test result|FAILED|panicked" | head -30
fi
if has checks; then
    step checks
    [ -n "$refs" ] && wait $refs
    for d in 128 256; do
        ref=$G/ref/flash-$d.db
        cp "$ref" "$OUT/ref/"
        for p in F32 Bf16; do
            $R $S run $G/flash-check.ron --db /tmp/$p-$d.db --device cuda --set model.d_model=$d \
                --set train.precision=$p > /tmp/$p-$d.log 2>&1 || tail -5 /tmp/$p-$d.log
            echo "d_model $d, $p: $(python3 benches/gpu/cmp_losses.py "$ref" /tmp/$p-$d.db)"
        done
    done
fi
if has attention; then
    step attention
    for s in 8,16,4,1024,128 1,16,4,4096,128 8,12,12,1024,64; do
        $R $S bench --attention $s --device cuda --steps 20 --warmup 5 2>&1 | grep "^attention\|flash"
        python3 benches/torch_attention.py --shape $s 2>&1 | grep "^| [A-Z]"
    done
fi
if has 1b; then
    step 1b
    $R $S bench sweeps/bench-1b.ron --device cuda --steps 4 --warmup 2 --phases --set "$D1" 2>&1 | grep "^| [a-z]\|phases"
fi
if has gpt2; then
    step gpt2
    $R $S bench sweeps/bench-gpt2.ron --device cuda --steps 20 --warmup 5 --set "$DT" 2>&1 | grep "^| [a-z]"
fi
if has d384; then
    step d384
    $R $S bench sweeps/bench-d384.ron --device cuda --steps 30 --warmup 5 --set "$DB" 2>&1 | grep "^| [a-z]"
fi
if has peers; then
    step peers
    python3 benches/torch_peer.py --config baseline --compile 2>&1 | tail -1
    python3 benches/torch_peer.py --config gpt2 --compile 2>&1 | tail -1
fi
if has ncu; then
    step ncu
    $R ncu --clock-control none -k regex:flash_ --launch-count 3 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        $S bench --attention 8,16,4,1024,128 --device cuda --steps 1 --warmup 0 > "$OUT/ncu.txt" 2>&1
    grep -E "^  flash_|Duration|Achieved Occupancy|stalled_(barrier|long_scoreboard|short_scoreboard|wait|math_pipe_throttle|not_selected)_per" \
        "$OUT/ncu.txt"
fi
if has graph; then
    step graph
    # train.graph: Step against eager: the same kernels in the same order, so the losses of
    # flash-check.ron (bf16, d_model 128) and of the Hc variants must agree exactly; then the
    # d384 width, GPT-2 small and the 1B pair with the step replayed.
    H='grid.residual=[Hc(streams: 4), Hc(streams: 4, dynamic: true), Laurel]'
    for g in Off Step; do
        $R $S run $G/flash-check.ron --db /tmp/graph-$g.db --device cuda --set train.precision=Bf16 \
            --set train.graph=$g > /tmp/graph-$g.log 2>&1 || tail -5 /tmp/graph-$g.log
        $R $S run $G/flash-check.ron --db /tmp/graph-hc-$g.db --device cuda --set train.precision=Bf16 \
            --set train.graph=$g --set "$H" > /tmp/graph-hc-$g.log 2>&1 || tail -5 /tmp/graph-hc-$g.log
    done
    # Eager against eager: the floor that atomics' order leaves, if any.
    $R $S run $G/flash-check.ron --db /tmp/graph-Off2.db --device cuda --set train.precision=Bf16 \
        > /tmp/graph-Off2.log 2>&1 || tail -5 /tmp/graph-Off2.log
    echo "eager against eager: $(python3 benches/gpu/cmp_losses.py /tmp/graph-Off.db /tmp/graph-Off2.db)"
    echo "graph against eager: $(python3 benches/gpu/cmp_losses.py /tmp/graph-Off.db /tmp/graph-Step.db)"
    echo "graph against eager, Hc: $(python3 benches/gpu/cmp_losses.py /tmp/graph-hc-Off.db /tmp/graph-hc-Step.db)"
    python3 -c 'import sqlite3, sys
for p in sys.argv[1:]:
    for kind, message in sqlite3.connect(p).execute("select kind, message from events"):
        print(p, kind, message[:300])' /tmp/graph-Step.db /tmp/graph-hc-Step.db
    G1="train.graph=Step"
    $R $S bench sweeps/bench-d384.ron --device cuda --steps 30 --warmup 5 --set "$DB" --set "$G1" 2>&1 | grep "^| [a-z]\|graph"
    $R $S bench sweeps/bench-gpt2.ron --device cuda --steps 20 --warmup 5 --set "$DT" --set "$G1" 2>&1 | grep "^| [a-z]\|graph"
    [ -n "${GRAPH_1B:-}" ] && $R $S bench sweeps/bench-1b.ron --device cuda --steps 4 --warmup 2 \
        --set "$D1" --set "$G1" 2>&1 | grep "^| [a-z]\|graph"
fi
if has profile; then
    step profile
    # Every kernel of the Goedel stack's step at 2 layers of the 1B shape (two steps, the
    # second summed), through ncu's kernel times; PROFILE=profile-gpt2 takes GPT-2 small's
    # PreNorm at 2 layers instead, with the torch.compile peer's kernels beside it.
    # PROFILE=profile-d384 the d384 width's Mhc (PROFILE_SET='grid.residual=[...]' another).
    P=${PROFILE:-profile-goedel}
    PD=$D1
    [ "$P" = profile-gpt2 ] && PD=$DT
    [ "$P" = profile-d384 ] && PD=$DB
    $R ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        $S bench benches/gpu/$P.ron --device cuda --steps 1 --warmup 1 --set "$PD" \
        ${PROFILE_SET:+--set "$PROFILE_SET"} > "$OUT/profile-$P.csv" 2>/tmp/profile.err \
        || tail -5 /tmp/profile.err
    python3 benches/gpu/kernel_times.py "$OUT/profile-$P.csv"
    if [ "$P" = profile-gpt2 ]; then
        python3 benches/torch_peer.py --config gpt2 --compile --layers 2 --profile > "$OUT/torch-profile.txt" 2>&1
        grep -E "tokens/s|Self CUDA time total" "$OUT/torch-profile.txt"
    fi
fi
if has ncu-mhc; then
    step ncu-mhc
    # mHC's state-sized kernels at the 1B shape (2 layers): memory throughput and stalls.
    $R ncu --clock-control none -k regex:"${NCU_K:-norm_proj_(bwd_x|part)_tc|postmix_fwd}" --launch-count ${NCU_N:-3} \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        $S bench benches/gpu/profile-goedel.ron --device cuda --steps 1 --warmup 0 --set "$D1" \
        > "$OUT/ncu-mhc.txt" 2>&1
    grep -E "^  [a-z_0-9]+.*\(|Duration|DRAM Throughput|Memory Throughput|L2 Hit|L1/TEX Hit|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|stalled_(barrier|long_scoreboard|short_scoreboard|wait|math_pipe_throttle|not_selected|lg_throttle|mio_throttle|drain|membar)_per" \
        "$OUT/ncu-mhc.txt" | head -80
fi
if has wgmma; then
    step wgmma
    nvcc -O2 -gencode arch=compute_90a,code=sm_90a -o /tmp/wgmma_probe benches/gpu/wgmma_probe.cu \
        && /tmp/wgmma_probe
fi
if has gutenberg; then
    step gutenberg
    P=$PWD/$G
    xz -dc $G/train-00.txt.xz > $G/train-00.txt && tar -C $G -xJf $G/eval.tar.xz
    $R $S run sweeps/goedel-1b-gutenberg.ron --device cuda --db "$OUT/gutenberg.db" \
        --set train.steps=300 \
        --set "data=Text(path: \"$P/train-00.txt\", tokenizer: Gpt2, val_fraction: 0.02)" \
        --set "evals=[Text(name: \"gutenberg_books\", path: \"$P/val.txt\"), Text(name: \"wikitext2\", path: \"$P/wikitext2.txt\")]" \
        --set "benchmark_dir=\"$P/eval\"" > "$OUT/gutenberg.log" 2>&1
    echo "rc $?"
    python3 benches/gpu/dump_trials.py "$OUT/gutenberg.db" | grep -v "^amax/.*/l[0-9]\|^stream_rms/l\|^streams/"
    rm -rf "$OUT"/gutenberg.checkpoints  # the final weights, 5 GB a trial: too large to bring back
fi
step done
} > "$O" 2>&1
tail -c 11000 "$O"
