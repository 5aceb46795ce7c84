// Causal flash attention (Dao et al. 2022, arXiv 2205.14135; the FlashAttention-2 split of
// the work, arXiv 2307.08691) for bf16 and head dimension 64, on the tensor cores through
// mma.sync m16n8k16. The scores and probabilities never reach memory: a thread block holds
// 64 queries (16 a warp) in registers and walks the key blocks at or before them with an
// online softmax. The backward pass recomputes them from the saved log-sum-exp, in two
// kernels (keys' and values' gradients by key block, queries' by query block), so that no
// gradient is accumulated with atomics and every run gives the same bits.
//
// Layouts, as attention.rs uses them: Q (B, H, T, 64) and K (B, KV, T, 64) contiguous; V and
// the output as rows (B T, KV 64) and (B T, H 64); query head h reads key/value head
// h / (H / KV). Log-sum-exp (B, H, T) f32, in base 2 of the scaled scores.
//
// Fragment layout of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 g + t:
// A (16 x 16) a0: (g, 2t..2t+1), a1: (g+8, 2t..), a2: (g, 2t+8..), a3: (g+8, 2t+8..);
// B (16 x 8) b0: (k 2t..2t+1, n g), b1: (k 2t+8.., n g); C (16 x 8) c0, c1: (g, 2t..2t+1),
// c2, c3: (g+8, 2t..2t+1). A C tile pair is therefore already an A fragment: the
// probabilities go from one product to the next without leaving registers.
//
// Compiled to PTX by components/build.rs under the `cuda` feature.

#include <cuda_bf16.h>
#include <stdint.h>

#define HD 64        // head dimension
#define BLK 64       // queries or keys per block
#define PAD 72       // shared row stride in bf16: rows start 4 banks apart, no conflicts
#define THREADS 128  // four warps of 16 rows

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t ld32(const bf16* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// A fragments of 16 rows x HD from global rows (row r at base + r * stride), zero past `valid`.
__device__ __forceinline__ void load_a(uint32_t (*a)[4], const bf16* base, size_t stride,
                                       int r0, int valid, int g, int t) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int r = r0 + g + (i & 1) * 8;
            int c = kk * 16 + 2 * t + (i >> 1) * 8;
            a[kk][i] = r < valid ? ld32(base + (size_t)r * stride + c) : 0u;
        }
    }
}

// Copies BLK rows x HD (row r at base + r * stride, rows at or past `valid` as zeros) into
// shared memory: as rows into `rows` and/or transposed (column d becomes row d) into `cols`.
__device__ __forceinline__ void stage(bf16 (*rows)[PAD], bf16 (*cols)[PAD], const bf16* base,
                                      size_t stride, int r0, int valid) {
    // Consecutive threads take consecutive rows: the transposed stores of a warp then fall in
    // consecutive banks.
    for (int i = threadIdx.x; i < BLK * HD / 8; i += THREADS) {
        int r = i % BLK, c = (i / BLK) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < valid) v = *reinterpret_cast<const uint4*>(base + (size_t)(r0 + r) * stride + c);
        if (rows) *reinterpret_cast<uint4*>(&rows[r][c]) = v;
        if (cols) {
            const bf16* e = reinterpret_cast<const bf16*>(&v);
#pragma unroll
            for (int j = 0; j < 8; ++j) cols[c + j][r] = e[j];
        }
    }
}

// acc (16 x 8 n-tiles) += A (16 x 16 kk-chunks, registers) B, with B's n-tile nt, k-chunk kk
// read from shared rows src[n][k] (src holds B transposed, i.e. row n is column n of B).
template <int KCH, int NT>
__device__ __forceinline__ void gemm(float (*acc)[4], const uint32_t (*a)[4],
                                     const bf16 (*src)[PAD], int g, int t) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int kk = 0; kk < KCH; ++kk) {
            uint32_t b0 = ld32(&src[nt * 8 + g][kk * 16 + 2 * t]);
            uint32_t b1 = ld32(&src[nt * 8 + g][kk * 16 + 8 + 2 * t]);
            mma(acc[nt], a[kk], b0, b1);
        }
    }
}

// The C tiles of a 16 x BLK product as A fragments of the next product (bf16).
__device__ __forceinline__ void to_a(uint32_t (*a)[4], const float (*c)[4]) {
#pragma unroll
    for (int kk = 0; kk < BLK / 16; ++kk) {
        a[kk][0] = pack(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

__device__ __forceinline__ void zero(float (*c)[4], int n) {
    for (int i = 0; i < n; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.0f;
}

// Row/column of C element e of n-tile nt, relative to the tile's origin.
#define C_ROW(e) (g + ((e) >> 1) * 8)
#define C_COL(nt, e) ((nt) * 8 + 2 * t + ((e) & 1))

// Where a thread of a kernel over query blocks (grid (query blocks, B H)) stands: its query
// block, batch and head, its lane's g and t, its warp's first query, and its key/value head's
// K and V. The longest rows go first: block x counts down from the last query block.
struct QueryTile {
    int qb, b, h, g, t, q0;
    const bf16* kp;
    const bf16* vp;
};

__device__ __forceinline__ QueryTile query_tile(const bf16* k, const bf16* v, int H, int KV,
                                                int T) {
    int qb = gridDim.x - 1 - blockIdx.x;
    int b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
    int lane = threadIdx.x % 32;
    return {qb,
            b,
            h,
            lane >> 2,
            lane & 3,
            qb * BLK + (int)(threadIdx.x / 32) * 16,
            k + (size_t)(b * KV + kvh) * T * HD,
            v + ((size_t)b * T * KV + kvh) * HD};
}

// Grid (query blocks, B H). Writes O (rows) and the log-sum-exp.
extern "C" __global__ void __launch_bounds__(THREADS)
flash_fwd_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, int H, int KV,
               int T, float scale_log2) {
    __shared__ __align__(16) bf16 ks[BLK][PAD];
    __shared__ __align__(16) bf16 vt[HD][PAD];
    auto [qb, b, h, g, t, q0, kp, vp] = query_tile(k, v, H, KV, T);

    uint32_t qa[HD / 16][4];
    load_a(qa, q + (size_t)(b * H + h) * T * HD, HD, q0, T, g, t);
    float acc[HD / 8][4];
    zero(acc, HD / 8);
    // Per thread, rows g and g + 8: running max and (this thread's share of) the sum.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    for (int kb = 0; kb <= qb; ++kb) {
        __syncthreads();  // the previous block's tiles are read by every warp
        stage(ks, nullptr, kp, HD, kb * BLK, T);
        stage(nullptr, vt, vp, (size_t)KV * HD, kb * BLK, T);
        __syncthreads();
        float s[BLK / 8][4];
        zero(s, BLK / 8);
        gemm<HD / 16, BLK / 8>(s, qa, ks, g, t);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < BLK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nt][e] * scale_log2;
                if (kb == qb && kb * BLK + C_COL(nt, e) > q0 + C_ROW(e)) x = -INFINITY;
                s[nt][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
            // Key kb * BLK is visible to every row of the block, so the new max is finite.
            float mn = fmaxf(m[r], mx[r]);
            alpha[r] = exp2f(m[r] - mn);
            m[r] = mn;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int nt = 0; nt < BLK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float p = exp2f(s[nt][e] - m[e >> 1]);
                s[nt][e] = p;
                l[e >> 1] += p;
            }
        }
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] *= alpha[e >> 1];
        }
        uint32_t pa[BLK / 16][4];
        to_a(pa, s);
        gemm<BLK / 16, HD / 8>(acc, pa, vt, g, t);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
    }
    size_t ostride = (size_t)H * HD;
    bf16* op = o + (size_t)b * T * ostride + (size_t)h * HD;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int row = q0 + g + r * 8;
        if (row >= T) continue;
        float inv = 1.0f / l[r];
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            __nv_bfloat162 pair =
                __floats2bfloat162_rn(acc[nt][2 * r] * inv, acc[nt][2 * r + 1] * inv);
            *reinterpret_cast<__nv_bfloat162*>(op + row * ostride + nt * 8 + 2 * t) = pair;
        }
        if (t == 0) lse[(size_t)(b * H + h) * T + row] = m[r] + log2f(l[r]);
    }
}

// D = rowsum(dO * O) per (b, h, query), the softmax backward's correction; one warp a row.
extern "C" __global__ void flash_bwd_dot_bf16(const bf16* o, const bf16* dout, float* d, int H,
                                              int T, int rows) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;  // row = (b T + tok) H + h, the rows layout's order
    const bf16* x = o + (size_t)row * HD;
    const bf16* y = dout + (size_t)row * HD;
    float s = 0.0f;
    for (int i = lane; i < HD; i += 32) s += __bfloat162float(x[i]) * __bfloat162float(y[i]);
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffff, s, off);
    int h = row % H, tok = (row / H) % T, b = row / H / T;
    if (lane == 0) d[(size_t)(b * H + h) * T + tok] = s;
}

// Grid (key blocks, B KV): dK (B, KV, T, 64) and dV (rows) of one key block, summed over the
// query heads that share it and the query blocks at or after it. A warp owns 16 keys and
// computes the transposed products (keys x queries) so its keys stay rows of its tiles.
extern "C" __global__ void __launch_bounds__(THREADS)
flash_bwd_kv_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                  const float* lse, const float* dsum, bf16* dk, bf16* dv, int H, int KV, int T,
                  float scale_log2, float scale) {
    __shared__ __align__(16) bf16 qs[BLK][PAD];
    __shared__ __align__(16) bf16 qt[HD][PAD];
    __shared__ __align__(16) bf16 ds[BLK][PAD];
    __shared__ __align__(16) bf16 dt[HD][PAD];
    __shared__ float ls[BLK], dd[BLK];
    int kb = blockIdx.x;
    int b = blockIdx.y / KV, kvh = blockIdx.y % KV, rep = H / KV;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    int k0 = kb * BLK + warp * 16;
    size_t kvstride = (size_t)KV * HD, ostride = (size_t)H * HD;
    uint32_t ka[HD / 16][4], va[HD / 16][4];
    load_a(ka, k + (size_t)(b * KV + kvh) * T * HD, HD, k0, T, g, t);
    load_a(va, v + ((size_t)b * T * KV + kvh) * HD, kvstride, k0, T, g, t);
    float dka[HD / 8][4], dva[HD / 8][4];
    zero(dka, HD / 8);
    zero(dva, HD / 8);
    int nqb = (T + BLK - 1) / BLK;

    for (int h = kvh * rep; h < (kvh + 1) * rep; ++h) {
        const bf16* qp = q + (size_t)(b * H + h) * T * HD;
        const bf16* op = dout + (size_t)b * T * ostride + (size_t)h * HD;
        const float* lp = lse + (size_t)(b * H + h) * T;
        const float* dp = dsum + (size_t)(b * H + h) * T;
        for (int qb = kb; qb < nqb; ++qb) {
            __syncthreads();
            stage(qs, qt, qp, HD, qb * BLK, T);
            stage(ds, dt, op, ostride, qb * BLK, T);
            for (int i = threadIdx.x; i < BLK; i += THREADS) {
                int row = qb * BLK + i;
                ls[i] = row < T ? lp[row] : 0.0f;
                dd[i] = row < T ? dp[row] : 0.0f;
            }
            __syncthreads();
            // S^T (16 keys x 64 queries) = K Q^T, dP^T = V dO^T.
            float st[BLK / 8][4], dpt[BLK / 8][4];
            zero(st, BLK / 8);
            zero(dpt, BLK / 8);
            gemm<HD / 16, BLK / 8>(st, ka, qs, g, t);
            gemm<HD / 16, BLK / 8>(dpt, va, ds, g, t);
#pragma unroll
            for (int nt = 0; nt < BLK / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int qi = C_COL(nt, e);
                    bool seen = k0 + C_ROW(e) <= qb * BLK + qi;
                    float p = seen ? exp2f(st[nt][e] * scale_log2 - ls[qi]) : 0.0f;
                    st[nt][e] = p;                       // P^T
                    dpt[nt][e] = p * (dpt[nt][e] - dd[qi]);  // dS^T
                }
            }
            uint32_t pa[BLK / 16][4], sa[BLK / 16][4];
            to_a(pa, st);
            to_a(sa, dpt);
            gemm<BLK / 16, HD / 8>(dva, pa, dt, g, t);  // dV += P^T dO
            gemm<BLK / 16, HD / 8>(dka, sa, qt, g, t);  // dK += dS^T Q
        }
    }
    bf16* kp = dk + (size_t)(b * KV + kvh) * T * HD;
    bf16* vp = dv + ((size_t)b * T * KV + kvh) * HD;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int row = k0 + g + r * 8;
        if (row >= T) continue;
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            int c = nt * 8 + 2 * t;
            *reinterpret_cast<__nv_bfloat162*>(kp + (size_t)row * HD + c) =
                __floats2bfloat162_rn(dka[nt][2 * r] * scale, dka[nt][2 * r + 1] * scale);
            *reinterpret_cast<__nv_bfloat162*>(vp + (size_t)row * kvstride + c) =
                __floats2bfloat162_rn(dva[nt][2 * r], dva[nt][2 * r + 1]);
        }
    }
}

// Grid (query blocks, B H): dQ (B, H, T, 64) of one query block over the key blocks at or
// before it.
extern "C" __global__ void __launch_bounds__(THREADS)
flash_bwd_q_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                 const float* lse, const float* dsum, bf16* dq, int H, int KV, int T,
                 float scale_log2, float scale) {
    __shared__ __align__(16) bf16 ks[BLK][PAD];
    __shared__ __align__(16) bf16 kt[HD][PAD];
    __shared__ __align__(16) bf16 vs[BLK][PAD];
    auto [qb, b, h, g, t, q0, kp, vp] = query_tile(k, v, H, KV, T);
    size_t ostride = (size_t)H * HD;
    uint32_t qa[HD / 16][4], oa[HD / 16][4];
    load_a(qa, q + (size_t)(b * H + h) * T * HD, HD, q0, T, g, t);
    load_a(oa, dout + (size_t)b * T * ostride + (size_t)h * HD, ostride, q0, T, g, t);
    float lr[2], dr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int row = q0 + g + r * 8;
        lr[r] = row < T ? lse[(size_t)(b * H + h) * T + row] : 0.0f;
        dr[r] = row < T ? dsum[(size_t)(b * H + h) * T + row] : 0.0f;
    }
    float dqa[HD / 8][4];
    zero(dqa, HD / 8);

    for (int kb = 0; kb <= qb; ++kb) {
        __syncthreads();
        stage(ks, kt, kp, HD, kb * BLK, T);
        stage(vs, nullptr, vp, (size_t)KV * HD, kb * BLK, T);
        __syncthreads();
        float s[BLK / 8][4], dp[BLK / 8][4];
        zero(s, BLK / 8);
        zero(dp, BLK / 8);
        gemm<HD / 16, BLK / 8>(s, qa, ks, g, t);   // S = Q K^T
        gemm<HD / 16, BLK / 8>(dp, oa, vs, g, t);  // dP = dO V^T
#pragma unroll
        for (int nt = 0; nt < BLK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                bool seen = kb * BLK + C_COL(nt, e) <= q0 + C_ROW(e);
                float p = seen ? exp2f(s[nt][e] * scale_log2 - lr[e >> 1]) : 0.0f;
                dp[nt][e] = p * (dp[nt][e] - dr[e >> 1]);  // dS
            }
        }
        uint32_t sa[BLK / 16][4];
        to_a(sa, dp);
        gemm<BLK / 16, HD / 8>(dqa, sa, kt, g, t);  // dQ += dS K
    }
    bf16* qp = dq + (size_t)(b * H + h) * T * HD;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int row = q0 + g + r * 8;
        if (row >= T) continue;
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            *reinterpret_cast<__nv_bfloat162*>(qp + (size_t)row * HD + nt * 8 + 2 * t) =
                __floats2bfloat162_rn(dqa[nt][2 * r] * scale, dqa[nt][2 * r + 1] * scale);
        }
    }
}
