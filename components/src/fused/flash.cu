// Causal flash attention (Dao et al. 2022, arXiv 2205.14135; the FlashAttention-2 split of
// the work, arXiv 2307.08691) for bf16 and head dimensions 64 and 128, on the tensor cores
// through mma.sync m16n8k16. The scores and probabilities never reach memory: a thread block
// of the forward pass holds 128 queries (32 a warp) and walks the key blocks at or before
// them with an online softmax. The backward pass recomputes them from the saved log-sum-exp,
// in two kernels (queries' gradients by query block, which also takes the softmax's
// correction D for its rows, then keys' and values' by key block), so that no gradient is
// accumulated with atomics and every run gives the same bits.
//
// Layouts, as attention.rs uses them: Q (B, H, T, HD) and K (B, KV, T, HD) contiguous; V and
// the output as rows (B T, KV HD) and (B T, H HD); query head h reads key/value head
// h / (H / KV), so grouped heads are read where they are, never widened. Log-sum-exp
// (B, H, T) f32, in base 2 of the scaled scores.
//
// In m16n8k16's fragment layout (mma.cuh) a C tile pair is already an A fragment: the
// probabilities go from one product to the next without leaving registers.
//
// Tiles sit in shared memory as rows (a token's HD values), HD + 8 bf16 apart so that the
// eight rows an 8 x 8 ldmatrix reads start 4 banks apart. ldmatrix reads them as A fragments,
// as B fragments of their transpose (Q K^T: keys are B's columns) and, with .trans, as B
// fragments of themselves (P V: keys are B's rows), so no tile is ever copied transposed.
//
// Compiled to PTX by components/build.rs under the `cuda` feature.

#include "flash.cuh"

#define BLK 64       // queries a block of the dQ kernel; keys a block of all
#define FWD_Q 128    // queries a block of the forward kernel, 32 a warp
#define KV_STEP 32   // queries a step of the dK/dV kernel, whose registers hold dK and dV
#define KQ 32        // keys a step of the dQ kernel: 70 KB of shared memory, three blocks an SM
#define THREADS 128  // four warps of 16 rows

extern __shared__ __align__(16) unsigned char flash_smem[];

// Four 8 x 8 bf16 matrices from shared memory; lane l gives the address of row l % 8 of
// matrix l / 8, and register i receives matrix i in the fragment layout (row g, cols 2t..).
__device__ __forceinline__ void ldsm4(uint32_t* r, const bf16* row) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// The same, each matrix transposed on the way (register i holds rows 2t..2t+1 of column g).
__device__ __forceinline__ void ldsm4t(uint32_t* r, const bf16* row) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// A tile of shared rows, HD wide, HD + 8 apart.
template <int HD>
using Tile = bf16 (*)[HD + 8];

// Copies n rows x HD (row r at base + r * stride) into shared rows with cp.async (sm_80+):
// the bytes go from memory to shared memory without passing through registers, and the block
// computes on the previous tile while they travel. Rows at or past `valid` are filled with
// zeros (a source size of 0). Consecutive threads take consecutive 16 bytes of a row: whole
// lines from memory. Completed by cp_wait and a barrier.
template <int HD>
__device__ __forceinline__ void stage_async(Tile<HD> dst, const bf16* base, size_t stride, int r0,
                                            int n, int valid) {
    for (int i = threadIdx.x; i < n * HD / 8; i += THREADS) {
        int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
        bool in = r0 + r < valid;
        const bf16* src = in ? base + (size_t)(r0 + r) * stride + c : base;
        uint32_t d = (uint32_t)__cvta_generic_to_shared(&dst[r][c]);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                     "r"(in ? 16 : 0));
    }
}

// The A fragments (16 rows from r0, k-chunk kk) of a shared tile.
template <int HD>
__device__ __forceinline__ void frag_a(uint32_t* a, Tile<HD> src, int r0, int kk) {
    int l = threadIdx.x % 32, m = l >> 3;
    ldsm4(a, &src[r0 + (m & 1) * 8 + (l & 7)][kk * 16 + (m >> 1) * 8]);
}

// acc (16 x 8 n-tiles, NT of them) += A B for B = src^T: row n of the shared tile is column
// n of B (Q K^T with K's rows as src). A as KCH k-chunks in registers (a) or, with `asrc`,
// read from 16 shared rows at ar0 chunk by chunk.
template <int HD, int KCH, int NT>
__device__ __forceinline__ void gemm_bt(float (*acc)[4], const uint32_t (*a)[4], Tile<HD> asrc,
                                        int ar0, Tile<HD> src, int n0) {
    int l = threadIdx.x % 32, m = l >> 3;
#pragma unroll
    for (int kk = 0; kk < KCH; kk += 2) {
        uint32_t af[2][4];
        if (asrc) {
            frag_a<HD>(af[0], asrc, ar0, kk);
            frag_a<HD>(af[1], asrc, ar0, kk + 1);
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) af[0][i] = a[kk][i], af[1][i] = a[kk + 1][i];
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            // Matrices: (n-tile nt, k kk lo), (nt, kk hi), (nt, kk+1 lo), (nt, kk+1 hi).
            uint32_t b[4];
            ldsm4(b, &src[n0 + nt * 8 + (l & 7)][kk * 16 + m * 8]);
            mma(acc[nt], af[0], b[0], b[1]);
            mma(acc[nt], af[1], b[2], b[3]);
        }
    }
}

// acc (16 x 8 n-tiles, NT of them, n from column 0) += A B for B = the shared rows k0.. of
// src as they are (P V with V's rows as src), A as KCH k-chunks in registers.
template <int HD, int KCH, int NT>
__device__ __forceinline__ void gemm_b(float (*acc)[4], const uint32_t (*a)[4], Tile<HD> src,
                                       int k0) {
    int l = threadIdx.x % 32, m = l >> 3;
#pragma unroll
    for (int kk = 0; kk < KCH; ++kk) {
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
            // Matrices: (k kk lo, n-tile nt), (kk hi, nt), (kk lo, nt+1), (kk hi, nt+1).
            uint32_t b[4];
            ldsm4t(b, &src[k0 + kk * 16 + (m & 1) * 8 + (l & 7)][(nt + (m >> 1)) * 8]);
            mma(acc[nt], a[kk], b[0], b[1]);
            mma(acc[nt + 1], a[kk], b[2], b[3]);
        }
    }
}

// Where a thread of a kernel over query blocks (grid (B H, query blocks)) stands: its query
// block, batch and head, its lane's g and t, its warp's first row in the block and first
// query, and its key/value head's K and V. Blocks start in the order of their index, x
// first: with the heads on x and block y counting down from the last query block, the
// longest rows of every head start before any shorter one, and the grid ends on short
// blocks instead of waiting on a late long one.
struct QueryTile {
    int qb, b, h, g, t, w0, q0;
    const bf16* kp;
    const bf16* vp;
};

template <int HD>
__device__ __forceinline__ QueryTile query_tile(const bf16* k, const bf16* v, int H, int KV,
                                                int T) {
    int qb = gridDim.y - 1 - blockIdx.y;
    int b = blockIdx.x / H, h = blockIdx.x % H, kvh = h / (H / KV);
    int lane = threadIdx.x % 32, w0 = (int)(threadIdx.x / 32) * 16;
    return {qb,
            b,
            h,
            lane >> 2,
            lane & 3,
            w0,
            qb * BLK + w0,
            k + (size_t)(b * KV + kvh) * T * HD,
            v + ((size_t)b * T * KV + kvh) * HD};
}

// Shared bytes of each kernel, as the host computes them (cuda.rs).
template <int HD>
constexpr int row_bytes() {
    return (HD + 8) * 2;
}

// Grid (B H, query blocks of FWD_Q); shared: the block's Q, then two buffers of K and V of a
// key block, the next block loading while the current one is used. A warp holds 32 queries
// as two m-tiles, so that each K fragment read from shared memory serves four products, not
// two (with 16 rows a warp the forward pass was bound by those reads). Q's fragments are
// read from shared memory too, and P V runs one m-tile at a time, leaving the registers to
// the two tiles' output and scores (Q K^T's chunks are not unrolled for the same reason:
// at HD 128 the kernel sits at 255 registers). Writes O (rows) and the log-sum-exp.
template <int HD>
__device__ __forceinline__ void fwd(const bf16* q, const bf16* k, const bf16* v, bf16* o,
                                    float* lse, int H, int KV, int T, float scale_log2) {
    Tile<HD> qs = reinterpret_cast<Tile<HD>>(flash_smem);
    // Buffer i: K at kbuf(i), V BLK rows after it.
    auto kbuf = [&](int i) { return qs + FWD_Q + i * 2 * BLK; };
    int qb = gridDim.y - 1 - blockIdx.y;  // the longest rows first (query_tile)
    int b = blockIdx.x / H, h = blockIdx.x % H, kvh = h / (H / KV);
    int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3, lm = lane >> 3;
    int w0 = (int)(threadIdx.x / 32) * 32, q0 = qb * FWD_Q + w0;
    const bf16* kp = k + (size_t)(b * KV + kvh) * T * HD;
    const bf16* vp = v + ((size_t)b * T * KV + kvh) * HD;
    size_t kvstride = (size_t)KV * HD;

    stage_async<HD>(qs, q + (size_t)(b * H + h) * T * HD, HD, qb * FWD_Q, FWD_Q, T);
    stage_async<HD>(kbuf(0), kp, HD, 0, BLK, T);
    stage_async<HD>(kbuf(0) + BLK, vp, kvstride, 0, BLK, T);
    cp_commit();
    float acc[2][HD / 8][4];
    zero<HD / 8>(acc[0]);
    zero<HD / 8>(acc[1]);
    // Per thread and m-tile, rows g and g + 8: running max and (this thread's share of) the
    // sum.
    float m[2][2], l[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) m[i][0] = m[i][1] = -INFINITY, l[i][0] = l[i][1] = 0.0f;
    // The last key block any query of the block sees.
    int last = min((qb * FWD_Q + FWD_Q - 1) / BLK, (T - 1) / BLK);

    for (int kb = 0; kb <= last; ++kb) {
        if (kb < last) {
            Tile<HD> next = kbuf((kb + 1) & 1);
            stage_async<HD>(next, kp, HD, (kb + 1) * BLK, BLK, T);
            stage_async<HD>(next + BLK, vp, kvstride, (kb + 1) * BLK, BLK, T);
        }
        cp_commit();
        cp_wait<1>();  // this block's tiles have landed; the next one's may still travel
        __syncthreads();
        Tile<HD> ks = kbuf(kb & 1), vs = ks + BLK;
        // A warp whose queries all come before the block has nothing to add (and the block
        // must still meet at the barriers).
        if (kb * BLK <= q0 + 31) {
            float s[2][BLK / 8][4];
            zero<BLK / 8>(s[0]);
            zero<BLK / 8>(s[1]);
#pragma unroll 1
            for (int kk = 0; kk < HD / 16; ++kk) {
                uint32_t af[2][4];
                frag_a<HD>(af[0], qs, w0, kk);
                frag_a<HD>(af[1], qs, w0 + 16, kk);
#pragma unroll
                for (int nt = 0; nt < BLK / 8; nt += 2) {
                    // Matrices: (n-tile nt, k lo), (nt, k hi), (nt + 1, k lo), (nt + 1, k hi).
                    uint32_t bf[4];
                    ldsm4(bf, &ks[(nt + (lm >> 1)) * 8 + (lane & 7)][kk * 16 + (lm & 1) * 8]);
#pragma unroll
                    for (int mt = 0; mt < 2; ++mt) {
                        mma(s[mt][nt], af[mt], bf[0], bf[1]);
                        mma(s[mt][nt + 1], af[mt], bf[2], bf[3]);
                    }
                }
            }
            bool diagonal = kb * BLK + BLK - 1 > q0;
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int nt = 0; nt < BLK / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = s[mt][nt][e] * scale_log2;
                        if (diagonal && kb * BLK + C_COL(nt, e) > q0 + mt * 16 + C_ROW(e))
                            x = -INFINITY;
                        s[mt][nt][e] = x;
                        mx[e >> 1] = fmaxf(mx[e >> 1], x);
                    }
                }
                float alpha[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
                    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
                    // Every row sees key 0, in block 0: from there on its max is finite.
                    float mn = fmaxf(m[mt][r], mx[r]);
                    alpha[r] = exp2f(m[mt][r] - mn);
                    m[mt][r] = mn;
                    l[mt][r] *= alpha[r];
                }
#pragma unroll
                for (int nt = 0; nt < BLK / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float p = exp2f(s[mt][nt][e] - m[mt][e >> 1]);
                        s[mt][nt][e] = p;
                        l[mt][e >> 1] += p;
                    }
                }
#pragma unroll
                for (int nt = 0; nt < HD / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][nt][e] *= alpha[e >> 1];
                }
                // O += P V for this m-tile.
                uint32_t pa[BLK / 16][4];
                to_a<BLK / 8>(pa, s[mt]);
#pragma unroll
                for (int kk = 0; kk < BLK / 16; ++kk) {
#pragma unroll
                    for (int nt = 0; nt < HD / 8; nt += 2) {
                        uint32_t bf[4];
                        ldsm4t(bf, &vs[kk * 16 + (lm & 1) * 8 + (lane & 7)][(nt + (lm >> 1)) * 8]);
                        mma(acc[mt][nt], pa[kk], bf[0], bf[1]);
                        mma(acc[mt][nt + 1], pa[kk], bf[2], bf[3]);
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with the buffer the next load overwrites
    }
    size_t ostride = (size_t)H * HD;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[mt][r] += __shfl_xor_sync(0xffffffff, l[mt][r], 1);
            l[mt][r] += __shfl_xor_sync(0xffffffff, l[mt][r], 2);
            inv[r] = 1.0f / l[mt][r];
            int row = q0 + mt * 16 + g + r * 8;
            if (t == 0 && row < T) lse[(size_t)(b * H + h) * T + row] = m[mt][r] + log2f(l[mt][r]);
        }
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] *= inv[e >> 1];
        }
        store_rows<HD>(o + (size_t)b * T * ostride + (size_t)h * HD, ostride, q0 + mt * 16, T,
                       acc[mt], 1.0f);
    }
}

// Grid (B KV, key blocks); shared: K and V of the block, then two buffers of Q and dO of a
// step of KV_STEP queries with their log-sum-exp and D, the next step loading while the
// current one is used. dK (B, KV, T, HD) and dV (rows) of one key block, summed over the
// query heads that share it and the queries at or after it. A warp owns 16 keys and computes
// the transposed products (keys x queries) so its keys stay rows of its tiles; K and V are
// read from shared memory, leaving the registers to dK and dV.
template <int HD>
__device__ __forceinline__ void bwd_kv(const bf16* q, const bf16* k, const bf16* v,
                                       const bf16* dout, const float* lse, const float* dsum,
                                       bf16* dk, bf16* dv, int H, int KV, int T,
                                       float scale_log2, float scale) {
    Tile<HD> ks = reinterpret_cast<Tile<HD>>(flash_smem);
    Tile<HD> vs = ks + BLK;
    // Buffer i: Q at qbuf(i), dO KV_STEP rows after it; log-sum-exp at lbuf(i), D KV_STEP
    // after it.
    auto qbuf = [&](int i) { return vs + BLK + i * 2 * KV_STEP; };
    float* lse_smem = reinterpret_cast<float*>(qbuf(2));
    auto lbuf = [&](int i) { return lse_smem + i * 2 * KV_STEP; };
    int kb = blockIdx.y;  // the first key blocks see the most queries: they start first
    int b = blockIdx.x / KV, kvh = blockIdx.x % KV, rep = H / KV;
    int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    int w0 = (int)(threadIdx.x / 32) * 16, k0 = kb * BLK + w0;
    size_t kvstride = (size_t)KV * HD, ostride = (size_t)H * HD;
    float dka[HD / 8][4], dva[HD / 8][4];
    zero<HD / 8>(dka);
    zero<HD / 8>(dva);
    // The steps: every query head of this key/value head, and its queries from this key
    // block's own (the first that see it) to the end.
    int first = kb * BLK / KV_STEP, per_head = (T + KV_STEP - 1) / KV_STEP - first;
    int items = rep * per_head;
    auto issue = [&](int item, int buf) {
        int h = kvh * rep + item / per_head, s0 = (first + item % per_head) * KV_STEP;
        stage_async<HD>(qbuf(buf), q + (size_t)(b * H + h) * T * HD, HD, s0, KV_STEP, T);
        stage_async<HD>(qbuf(buf) + KV_STEP, dout + (size_t)b * T * ostride + (size_t)h * HD,
                        ostride, s0, KV_STEP, T);
        // Through cp.async too: a plain load here would hold its warp, and at the next
        // barrier the block, for the load's whole latency every step.
        stage_floats_async<THREADS>(lbuf(buf), lse + (size_t)(b * H + h) * T, s0, KV_STEP, T);
        stage_floats_async<THREADS>(lbuf(buf) + KV_STEP, dsum + (size_t)(b * H + h) * T, s0, KV_STEP, T);
    };
    stage_async<HD>(ks, k + (size_t)(b * KV + kvh) * T * HD, HD, kb * BLK, BLK, T);
    stage_async<HD>(vs, v + ((size_t)b * T * KV + kvh) * HD, kvstride, kb * BLK, BLK, T);
    issue(0, 0);
    cp_commit();

    for (int item = 0; item < items; ++item) {
        int buf = item & 1, s0 = (first + item % per_head) * KV_STEP;
        if (item + 1 < items) issue(item + 1, buf ^ 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        Tile<HD> qs = qbuf(buf), ds = qs + KV_STEP;
        const float* ls = lbuf(buf);
        const float* dd = ls + KV_STEP;
        // S^T (16 keys x KV_STEP queries) = K Q^T, dP^T = V dO^T.
        float st[KV_STEP / 8][4], dpt[KV_STEP / 8][4];
        zero<KV_STEP / 8>(st);
        zero<KV_STEP / 8>(dpt);
        gemm_bt<HD, HD / 16, KV_STEP / 8>(st, nullptr, ks, w0, qs, 0);
        gemm_bt<HD, HD / 16, KV_STEP / 8>(dpt, nullptr, vs, w0, ds, 0);
#pragma unroll
        for (int nt = 0; nt < KV_STEP / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int qi = C_COL(nt, e);
                bool seen = k0 + C_ROW(e) <= s0 + qi && s0 + qi < T;
                float p = seen ? exp2f(st[nt][e] * scale_log2 - ls[qi]) : 0.0f;
                st[nt][e] = p;                           // P^T
                dpt[nt][e] = p * (dpt[nt][e] - dd[qi]);  // dS^T
            }
        }
        uint32_t pa[KV_STEP / 16][4], sa[KV_STEP / 16][4];
        to_a<KV_STEP / 8>(pa, st);
        to_a<KV_STEP / 8>(sa, dpt);
        gemm_b<HD, KV_STEP / 16, HD / 8>(dva, pa, ds, 0);  // dV += P^T dO
        gemm_b<HD, KV_STEP / 16, HD / 8>(dka, sa, qs, 0);  // dK += dS^T Q
        __syncthreads();  // every warp is done with the buffer the next load overwrites
    }
    store_rows<HD>(dk + (size_t)(b * KV + kvh) * T * HD, HD, k0, T, dka, scale);
    store_rows<HD>(dv + ((size_t)b * T * KV + kvh) * HD, kvstride, k0, T, dva, 1.0f);
}

// Grid (B H, query blocks); shared: Q and dO of the block, two buffers of K and V of KQ keys.
// dQ (B, H, T, HD) of one query block over the keys at or before it, and D of its rows
// (row_dots), which the dK/dV kernel after it reads. Steps of 32 keys rather than 64 leave
// room for three blocks an SM (shared memory and, with the launch bound, 168 registers), and
// took the kernel from 326 to 289 us at (8, 16, 4, 1024, 128) on an H200 (ncu).
template <int HD>
__device__ __forceinline__ void bwd_q(const bf16* q, const bf16* k, const bf16* v,
                                      const bf16* o, const bf16* dout, const float* lse,
                                      float* dsum, bf16* dq, int H, int KV, int T,
                                      float scale_log2, float scale) {
    Tile<HD> qs = reinterpret_cast<Tile<HD>>(flash_smem);
    Tile<HD> os = qs + BLK;
    // Buffer i: K at kbuf(i), V KQ rows after it.
    auto kbuf = [&](int i) { return os + BLK + i * 2 * KQ; };
    auto [qb, b, h, g, t, w0, q0, kp, vp] = query_tile<HD>(k, v, H, KV, T);
    size_t ostride = (size_t)H * HD, kvstride = (size_t)KV * HD;
    const bf16* dop = dout + (size_t)b * T * ostride + (size_t)h * HD;
    stage_async<HD>(qs, q + (size_t)(b * H + h) * T * HD, HD, qb * BLK, BLK, T);
    stage_async<HD>(os, dop, ostride, qb * BLK, BLK, T);
    stage_async<HD>(kbuf(0), kp, HD, 0, KQ, T);
    stage_async<HD>(kbuf(0) + KQ, vp, kvstride, 0, KQ, T);
    cp_commit();
    // While the first tiles travel.
    float lr[2], dr[2];
    row_dots<HD>(o + (size_t)b * T * ostride + (size_t)h * HD, dop, ostride, q0, T,
                 dsum + (size_t)(b * H + h) * T, dr);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int row = q0 + g + r * 8;
        lr[r] = row < T ? lse[(size_t)(b * H + h) * T + row] : 0.0f;
    }
    float dqa[HD / 8][4];
    zero<HD / 8>(dqa);
    // The last key step any query of the block sees.
    int last = min((qb * BLK + BLK - 1) / KQ, (T - 1) / KQ);

    for (int kb = 0; kb <= last; ++kb) {
        if (kb < last) {
            Tile<HD> next = kbuf((kb + 1) & 1);
            stage_async<HD>(next, kp, HD, (kb + 1) * KQ, KQ, T);
            stage_async<HD>(next + KQ, vp, kvstride, (kb + 1) * KQ, KQ, T);
        }
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        Tile<HD> ks = kbuf(kb & 1), vs = ks + KQ;
        // A warp whose queries all come before the step's keys has nothing to add.
        if (kb * KQ <= q0 + 15) {
            float s[KQ / 8][4], dp[KQ / 8][4];
            zero<KQ / 8>(s);
            zero<KQ / 8>(dp);
            gemm_bt<HD, HD / 16, KQ / 8>(s, nullptr, qs, w0, ks, 0);   // S = Q K^T
            gemm_bt<HD, HD / 16, KQ / 8>(dp, nullptr, os, w0, vs, 0);  // dP = dO V^T
#pragma unroll
            for (int nt = 0; nt < KQ / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    bool seen = kb * KQ + C_COL(nt, e) <= q0 + C_ROW(e);
                    float p = seen ? exp2f(s[nt][e] * scale_log2 - lr[e >> 1]) : 0.0f;
                    dp[nt][e] = p * (dp[nt][e] - dr[e >> 1]);  // dS
                }
            }
            uint32_t sa[KQ / 16][4];
            to_a<KQ / 8>(sa, dp);
            gemm_b<HD, KQ / 16, HD / 8>(dqa, sa, ks, 0);  // dQ += dS K
        }
        __syncthreads();  // every warp is done with the buffer the next load overwrites
    }
    store_rows<HD>(dq + (size_t)(b * H + h) * T * HD, HD, q0, T, dqa, scale);
}

// The entry points, one per head dimension: flash_<pass>_hd<HD>.
#define FLASH_KERNELS(HD)                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS)                                     \
        flash_fwd_hd##HD(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,     \
                         int H, int KV, int T, float scale_log2) {                             \
        fwd<HD>(q, k, v, o, lse, H, KV, T, scale_log2);                                       \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_kv_hd##HD(                   \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,      \
        const float* dsum, bf16* dk, bf16* dv, int H, int KV, int T, float scale_log2,        \
        float scale) {                                                                        \
        bwd_kv<HD>(q, k, v, dout, lse, dsum, dk, dv, H, KV, T, scale_log2, scale);            \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS, 3) flash_q_hd##HD(                 \
        const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout,         \
        const float* lse, float* dsum, bf16* dq, int H, int KV, int T, float scale_log2,      \
        float scale) {                                                                        \
        bwd_q<HD>(q, k, v, o, dout, lse, dsum, dq, H, KV, T, scale_log2, scale);              \
    }

FLASH_KERNELS(64)
FLASH_KERNELS(128)
