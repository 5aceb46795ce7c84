// Fused kernels for the two memory-bound hot spots of a training step on the GPU (see
// fused/mod.rs): the causal softmax of attention scores and the cross-entropy over the
// vocabulary. One thread block per row; values are read in their storage dtype (f32 or
// bf16) and every sum, max and exp is taken in f32.
//
// Compiled to PTX by components/build.rs under the `cuda` feature.

#include <cuda_bf16.h>
#include <stdint.h>

#include "mma.cuh"

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// 16 bytes of T (8 bf16 or 4 f32) moved as one load or store: the element-wise kernels below
// read and write through these where every pointer is 16-byte aligned and the row length is
// a multiple of the vector, and one value at a time otherwise.
template <typename T>
struct Pack {
    static constexpr int N = 16 / sizeof(T);
    union {
        uint4 raw;
        T v[16 / sizeof(T)];
    };
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p, size_t i) {
    Pack<T> k;
    k.raw = reinterpret_cast<const uint4*>(p)[i];
    return k;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, size_t i, const Pack<T>& k) {
    reinterpret_cast<uint4*>(p)[i] = k.raw;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Block-wide reductions; blockDim.x is a multiple of 32. `scratch` holds 32 floats. The
// result is returned to every thread.
__device__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    v = lane < warps ? scratch[lane] : -INFINITY;
    for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    v = lane < warps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Scores (rows, tk) -> probabilities softmax(scale * s) over the keys a query may see. Row r
// is query (r mod tq), which sees keys 0 ..= (r mod tq) + tk - tq; the rest get 0 and are
// not read. A row lives in registers, SM_E values a thread (blockDim.x * SM_E >= tk), so it
// is read once.
#define SM_E 8

template <typename T>
__device__ void causal_softmax_fwd(const T* s, T* p, int tq, int tk, float scale) {
    __shared__ float scratch[32];
    size_t row = blockIdx.x;
    int last = (int)(row % tq) + tk - tq;
    const T* x = s + row * tk;
    T* y = p + row * tk;
    float v[SM_E];
    float m = -INFINITY;
#pragma unroll
    for (int e = 0; e < SM_E; e++) {
        int j = threadIdx.x + e * blockDim.x;
        v[e] = j <= last ? scale * to_f(x[j]) : -INFINITY;
        m = fmaxf(m, v[e]);
    }
    m = block_max(m, scratch);
    float sum = 0.0f;
#pragma unroll
    for (int e = 0; e < SM_E; e++) {
        int j = threadIdx.x + e * blockDim.x;
        v[e] = j <= last ? __expf(v[e] - m) : 0.0f;
        sum += v[e];
    }
    float inv = 1.0f / block_sum(sum, scratch);
#pragma unroll
    for (int e = 0; e < SM_E; e++) {
        int j = threadIdx.x + e * blockDim.x;
        if (j < tk) y[j] = from_f<T>(v[e] * inv);
    }
}

// Given P and dL/dP, dL/ds = scale * P * (dP - sum_k P_k dP_k); masked entries get 0.
template <typename T>
__device__ void causal_softmax_bwd(const T* p, const T* dp, T* ds, int tq, int tk, float scale) {
    __shared__ float scratch[32];
    size_t row = blockIdx.x;
    int last = (int)(row % tq) + tk - tq;
    const T* pr = p + row * tk;
    const T* dpr = dp + row * tk;
    T* out = ds + row * tk;
    float pv[SM_E], gv[SM_E];
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < SM_E; e++) {
        int j = threadIdx.x + e * blockDim.x;
        pv[e] = j <= last ? to_f(pr[j]) : 0.0f;
        gv[e] = j <= last ? to_f(dpr[j]) : 0.0f;
        dot += pv[e] * gv[e];
    }
    dot = block_sum(dot, scratch);
#pragma unroll
    for (int e = 0; e < SM_E; e++) {
        int j = threadIdx.x + e * blockDim.x;
        if (j < tk) out[j] = from_f<T>(scale * pv[e] * (gv[e] - dot));
    }
}

// The row's max and sum of exp(x - max), for the cross-entropy.
template <typename T>
__device__ void row_log_sum_exp(const T* x, int v, float* scratch, float* m_out, float* s_out) {
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, to_f(x[j]));
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) sum += __expf(to_f(x[j]) - m);
    *m_out = m;
    *s_out = block_sum(sum, scratch);
}

// A cross-entropy row held in registers: up to CE_PACKS 16-byte packs a thread, so that the
// row is read from memory once (the vocabulary of GPT-2's tokenizer, 50,304 bf16 logits, is
// 6,288 packs: seven a thread of a 1024-thread block).
#define CE_PACKS 8

template <typename T>
struct CeRow {
    Pack<T> k[CE_PACKS];
    float m, sum;
};

// Whether the row of v logits at x fits the register path.
template <typename T>
__device__ __forceinline__ bool ce_fits(const T* x, int v) {
    constexpr int V = Pack<T>::N;
    return v % V == 0 && aligned16(x) && v / V <= CE_PACKS * (int)blockDim.x;
}

// Loads the row and takes its max and sum of exp(x - max) from the registers.
template <typename T>
__device__ void ce_load(const T* x, int v, float* scratch, CeRow<T>& row) {
    constexpr int V = Pack<T>::N;
    int packs = v / V;
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < CE_PACKS; ++i) {
        int p = threadIdx.x + i * blockDim.x;
        if (p < packs) {
            row.k[i] = load_pack(x, p);
#pragma unroll
            for (int e = 0; e < V; ++e) m = fmaxf(m, to_f(row.k[i].v[e]));
        }
    }
    m = block_max(m, scratch);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < CE_PACKS; ++i) {
        int p = threadIdx.x + i * blockDim.x;
        if (p < packs) {
#pragma unroll
            for (int e = 0; e < V; ++e) sum += __expf(to_f(row.k[i].v[e]) - m);
        }
    }
    row.m = m;
    row.sum = block_sum(sum, scratch);
}

// Logits (rows, v) and targets (rows) -> loss (rows) = logsumexp(x) - x[target], in f32.
template <typename T>
__device__ void cross_entropy_fwd(const T* logits, const uint32_t* targets, float* loss, int v) {
    __shared__ float scratch[32];
    size_t row = blockIdx.x;
    const T* x = logits + row * v;
    float m, sum;
    if (ce_fits(x, v)) {
        CeRow<T> r;
        ce_load(x, v, scratch, r);
        m = r.m;
        sum = r.sum;
    } else {
        row_log_sum_exp(x, v, scratch, &m, &sum);
    }
    if (threadIdx.x == 0) loss[row] = logf(sum) + m - to_f(x[targets[row]]);
}

// dL/dx = g_row * (softmax(x) - onehot(target)), with g = dL/dloss per row.
template <typename T>
__device__ void cross_entropy_bwd(const T* logits, const uint32_t* targets, const float* g,
                                  T* grad, int v) {
    __shared__ float scratch[32];
    size_t row = blockIdx.x;
    const T* x = logits + row * v;
    T* out = grad + row * v;
    uint32_t t = targets[row];
    if (ce_fits(x, v) && aligned16(out)) {
        constexpr int V = Pack<T>::N;
        CeRow<T> r;
        ce_load(x, v, scratch, r);
        float scale = g[row] / r.sum;
        int packs = v / V;
#pragma unroll
        for (int i = 0; i < CE_PACKS; ++i) {
            int p = threadIdx.x + i * blockDim.x;
            if (p < packs) {
                Pack<T> o;
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    int j = p * V + e;
                    float d = __expf(to_f(r.k[i].v[e]) - r.m) * scale - (j == (int)t ? g[row] : 0.0f);
                    o.v[e] = from_f<T>(d);
                }
                store_pack(out, p, o);
            }
        }
        return;
    }
    float m, sum;
    row_log_sum_exp(x, v, scratch, &m, &sum);
    float scale = g[row] / sum;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float d = __expf(to_f(x[j]) - m) * scale - (j == (int)t ? g[row] : 0.0f);
        out[j] = from_f<T>(d);
    }
}

#define FOR_DTYPES(F) F(f32, float) F(bf16, __nv_bfloat16)

#define KERNELS(NAME, T)                                                                   \
    extern "C" __global__ void causal_softmax_fwd_##NAME(const T* s, T* p, int tq, int tk, \
                                                         float scale) {                    \
        causal_softmax_fwd<T>(s, p, tq, tk, scale);                                        \
    }                                                                                      \
    extern "C" __global__ void causal_softmax_bwd_##NAME(const T* p, const T* dp, T* ds,   \
                                                         int tq, int tk, float scale) {    \
        causal_softmax_bwd<T>(p, dp, ds, tq, tk, scale);                                   \
    }                                                                                      \
    extern "C" __global__ void cross_entropy_fwd_##NAME(const T* logits,                   \
                                                        const uint32_t* targets,           \
                                                        float* loss, int v) {              \
        cross_entropy_fwd<T>(logits, targets, loss, v);                                    \
    }                                                                                      \
    extern "C" __global__ void cross_entropy_bwd_##NAME(const T* logits,                   \
                                                        const uint32_t* targets,           \
                                                        const float* g, T* grad, int v) {  \
        cross_entropy_bwd<T>(logits, targets, g, grad, v);                                 \
    }

FOR_DTYPES(KERNELS)

// RMSNorm over rows of length c: y = x / sqrt(mean(x^2) + eps) * g (g in f32, or none). One
// warp per row; each lane strides over the row, a pack at a time where it can.
template <typename T>
__device__ float row_rstd(const T* x, int c, float eps) {
    constexpr int V = Pack<T>::N;
    int lane = threadIdx.x % 32;
    int packs = (c % V == 0 && aligned16(x)) ? c / V : 0;
    float ss = 0.0f;
    for (int p = lane; p < packs; p += 32) {
        Pack<T> k = load_pack(x, p);
#pragma unroll
        for (int e = 0; e < V; ++e) ss += to_f(k.v[e]) * to_f(k.v[e]);
    }
    for (int j = packs * V + lane; j < c; j += 32) {
        float v = to_f(x[j]);
        ss += v * v;
    }
    for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffff, ss, o);
    return rsqrtf(ss / c + eps);
}

// The rows of the two kernels below are read and written in 16-byte packs where the row
// length is a multiple of the pack and the pointers are aligned, a value at a time otherwise
// (`packs` 0): a warp's scalar bf16 loads move 64 bytes, a pack's 512.
template <typename T>
__device__ void rms_norm_fwd(const T* x, const float* g, T* y, int rows, int c, float eps) {
    constexpr int V = Pack<T>::N;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * c;
    T* yr = y + (size_t)row * c;
    float r = row_rstd(xr, c, eps);
    int lane = threadIdx.x % 32;
    int packs = (c % V == 0 && aligned16(xr) && aligned16(yr)) ? c / V : 0;
    for (int p = lane; p < packs; p += 32) {
        Pack<T> k = load_pack(xr, p);
#pragma unroll
        for (int e = 0; e < V; ++e)
            k.v[e] = from_f<T>(to_f(k.v[e]) * r * (g ? g[p * V + e] : 1.0f));
        store_pack(yr, p, k);
    }
    for (int j = packs * V + lane; j < c; j += 32)
        yr[j] = from_f<T>(to_f(xr[j]) * r * (g ? g[j] : 1.0f));
}

// dx = r (dxh - xh mean(dxh xh)), with xh = x r and dxh = dy g; plus acc where given (acc
// may be dx itself: each element is read and then written by the same thread).
template <typename T>
__device__ void rms_norm_bwd_x(const T* x, const float* g, const T* dy, const T* acc, T* dx,
                               int rows, int c, float eps) {
    constexpr int V = Pack<T>::N;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * c;
    const T* dyr = dy + (size_t)row * c;
    T* dxr = dx + (size_t)row * c;
    const T* ar = acc ? acc + (size_t)row * c : nullptr;
    float r = row_rstd(xr, c, eps);
    int lane = threadIdx.x % 32;
    bool fits = c % V == 0 && aligned16(xr) && aligned16(dyr) && aligned16(dxr) &&
                (!ar || aligned16(ar));
    int packs = fits ? c / V : 0;
    float dot = 0.0f;
    for (int p = lane; p < packs; p += 32) {
        Pack<T> xk = load_pack(xr, p), dk = load_pack(dyr, p);
#pragma unroll
        for (int e = 0; e < V; ++e)
            dot += to_f(dk.v[e]) * (g ? g[p * V + e] : 1.0f) * to_f(xk.v[e]) * r;
    }
    for (int j = packs * V + lane; j < c; j += 32)
        dot += to_f(dyr[j]) * (g ? g[j] : 1.0f) * to_f(xr[j]) * r;
    for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffff, dot, o);
    dot /= c;
    for (int p = lane; p < packs; p += 32) {
        Pack<T> xk = load_pack(xr, p), dk = load_pack(dyr, p), ak;
        if (ar) ak = load_pack(ar, p);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            float xh = to_f(xk.v[e]) * r;
            float v = r * (to_f(dk.v[e]) * (g ? g[p * V + e] : 1.0f) - xh * dot);
            xk.v[e] = from_f<T>(ar ? to_f(ak.v[e]) + v : v);
        }
        store_pack(dxr, p, xk);
    }
    for (int j = packs * V + lane; j < c; j += 32) {
        float xh = to_f(xr[j]) * r;
        float v = r * (to_f(dyr[j]) * (g ? g[j] : 1.0f) - xh * dot);
        dxr[j] = from_f<T>(ar ? to_f(ar[j]) + v : v);
    }
}

// dg[j] = sum over rows of dy[., j] xh[., j]. A block takes NORM_G_TILE rows at a time: its
// warps first put the rows' 1 / rms in shared memory, then each thread adds up its own columns
// (a 16-byte pack of them where the rows allow) over the tile, coalesced and without atomics,
// keeping the sums in shared memory; the block adds them to dg (zeroed by the caller) once. (An earlier version gave each warp whole rows and had
// the block's warps meet in shared-memory atomics: a tenth of the bandwidth.)
#define NORM_G_TILE 16
template <typename T>
__device__ void rms_norm_bwd_g(const T* x, const T* dy, float* dg, int rows, int c, float eps) {
    constexpr int V = Pack<T>::N;
    extern __shared__ float acc[];  // c floats, then NORM_G_TILE
    float* rs = acc + c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) acc[j] = 0.0f;
    int warps = blockDim.x / 32, warp = threadIdx.x / 32;
    // Rows of whole 16-byte packs: each thread sums a pack of columns (all rows start
    // aligned when the first does and c is a multiple of the pack).
    int packs = (c % V == 0 && aligned16(x) && aligned16(dy)) ? c / V : 0;
    for (int r0 = blockIdx.x * NORM_G_TILE; r0 < rows; r0 += gridDim.x * NORM_G_TILE) {
        int n = min(NORM_G_TILE, rows - r0);
        __syncthreads();  // the previous tile's rs are no longer read
        for (int i = warp; i < n; i += warps) {
            float r = row_rstd(x + (size_t)(r0 + i) * c, c, eps);
            if (threadIdx.x % 32 == 0) rs[i] = r;
        }
        __syncthreads();
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
            float s[V];
#pragma unroll
            for (int e = 0; e < V; ++e) s[e] = 0.0f;
            for (int i = 0; i < n; ++i) {
                size_t row = (size_t)(r0 + i) * c;
                Pack<T> xk = load_pack(x + row, p), dk = load_pack(dy + row, p);
#pragma unroll
                for (int e = 0; e < V; ++e) s[e] += to_f(dk.v[e]) * to_f(xk.v[e]) * rs[i];
            }
#pragma unroll
            for (int e = 0; e < V; ++e) acc[p * V + e] += s[e];
        }
        for (int j = packs * V + threadIdx.x; j < c; j += blockDim.x) {
            float s = 0.0f;
            for (int i = 0; i < n; ++i) {
                size_t k = (size_t)(r0 + i) * c + j;
                s += to_f(dy[k]) * to_f(x[k]) * rs[i];
            }
            acc[j] += s;
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < c; j += blockDim.x) atomicAdd(&dg[j], acc[j]);
}

// Embedding: out[i, :] = w[ids[i], :] and its backward dw[ids[i], :] += dout[i, :] (dw
// zeroed by the caller). f32 weights: the master copy.
extern "C" __global__ void embedding_fwd(const float* w, const uint32_t* ids, float* out, int n,
                                         int c) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * c) return;
    out[i] = w[(size_t)ids[i / c] * c + i % c];
}

extern "C" __global__ void embedding_bwd(const float* dout, const uint32_t* ids, float* dw, int n,
                                         int c) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * c) return;
    atomicAdd(&dw[(size_t)ids[i / c] * c + i % c], dout[i]);
}

#define NORM_KERNELS(NAME, T)                                                                  \
    extern "C" __global__ void rms_norm_fwd_##NAME(const T* x, const float* g, T* y, int rows,  \
                                                   int c, float eps) {                         \
        rms_norm_fwd<T>(x, g, y, rows, c, eps);                                                \
    }                                                                                          \
    extern "C" __global__ void rms_norm_bwd_x_##NAME(const T* x, const float* g, const T* dy,   \
                                                     const T* acc, T* dx, int rows, int c,     \
                                                     float eps) {                              \
        rms_norm_bwd_x<T>(x, g, dy, acc, dx, rows, c, eps);                                    \
    }                                                                                          \
    extern "C" __global__ void rms_norm_bwd_g_##NAME(const T* x, const T* dy, float* dg,        \
                                                     int rows, int c, float eps) {             \
        rms_norm_bwd_g<T>(x, dy, dg, rows, c, eps);                                            \
    }

FOR_DTYPES(NORM_KERNELS)

// Elementwise activations and their derivatives: kind 0 is GELU with erf (PyTorch's exact
// GELU), kind 1 is ReLU squared.
__device__ __forceinline__ float act_f(float x, int kind) {
    if (kind == 0) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    float r = fmaxf(x, 0.0f);
    return r * r;
}

__device__ __forceinline__ float act_df(float x, int kind) {
    if (kind == 0)
        return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) +
               x * 0.39894228040143268f * __expf(-0.5f * x * x);
    return 2.0f * fmaxf(x, 0.0f);
}

template <typename T>
__device__ void act_fwd(const T* x, T* y, size_t n, int kind) {
    constexpr int V = Pack<T>::N;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t packs = (aligned16(x) && aligned16(y)) ? n / V : 0;
    for (size_t i = first; i < packs; i += stride) {
        Pack<T> k = load_pack(x, i);
#pragma unroll
        for (int e = 0; e < V; ++e) k.v[e] = from_f<T>(act_f(to_f(k.v[e]), kind));
        store_pack(y, i, k);
    }
    for (size_t i = packs * V + first; i < n; i += stride) y[i] = from_f<T>(act_f(to_f(x[i]), kind));
}

template <typename T>
__device__ void act_bwd(const T* x, const T* dy, T* dx, size_t n, int kind) {
    constexpr int V = Pack<T>::N;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t packs = (aligned16(x) && aligned16(dy) && aligned16(dx)) ? n / V : 0;
    for (size_t i = first; i < packs; i += stride) {
        Pack<T> a = load_pack(x, i), d = load_pack(dy, i);
#pragma unroll
        for (int e = 0; e < V; ++e) a.v[e] = from_f<T>(to_f(d.v[e]) * act_df(to_f(a.v[e]), kind));
        store_pack(dx, i, a);
    }
    for (size_t i = packs * V + first; i < n; i += stride)
        dx[i] = from_f<T>(to_f(dy[i]) * act_df(to_f(x[i]), kind));
}

#define ACT_KERNELS(NAME, T)                                                                  \
    extern "C" __global__ void act_fwd_##NAME(const T* x, T* y, size_t n, int kind) {          \
        act_fwd<T>(x, y, n, kind);                                                            \
    }                                                                                         \
    extern "C" __global__ void act_bwd_##NAME(const T* x, const T* dy, T* dx, size_t n,        \
                                              int kind) {                                     \
        act_bwd<T>(x, dy, dx, n, kind);                                                       \
    }

FOR_DTYPES(ACT_KERNELS)

// out = a + b, elementwise: the residual's sum, 16 bytes a thread (candle's own add moves a
// value a thread through its strided-index path).
#define ADD_KERNELS(NAME, T)                                                                  \
    extern "C" __global__ void add_##NAME(const T* a, const T* b, T* out, size_t n) {          \
        constexpr int V = Pack<T>::N;                                                         \
        size_t stride = (size_t)gridDim.x * blockDim.x;                                       \
        size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;                         \
        size_t packs = (aligned16(a) && aligned16(b) && aligned16(out)) ? n / V : 0;          \
        for (size_t i = first; i < packs; i += stride) {                                      \
            Pack<T> x = load_pack(a, i), y = load_pack(b, i);                                 \
            _Pragma("unroll") for (int e = 0; e < V; ++e)                                     \
                x.v[e] = from_f<T>(to_f(x.v[e]) + to_f(y.v[e]));                              \
            store_pack(out, i, x);                                                            \
        }                                                                                     \
        for (size_t i = packs * V + first; i < n; i += stride)                                \
            out[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));                                      \
    }

FOR_DTYPES(ADD_KERNELS)

// [a; b] of f32 values a (na) and b (nb) cast to bf16 in one pass: SwiGLU's gate and up
// weights as the one matrix its GEMM takes, where two casts and a concatenation moved the
// bf16 copy twice more. Four values a thread (16 bytes read, 8 written) where na allows.
extern "C" __global__ void stack_cast_bf16(const float* a, const float* b, __nv_bfloat16* out,
                                           size_t na, size_t nb) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t n = na + nb;
    bool quads = na % 4 == 0 && nb % 4 == 0 && aligned16(a) && aligned16(b);
    size_t fours = quads ? n / 4 : 0;
    for (size_t q = first; q < fours; q += stride) {
        size_t i = q * 4;
        float4 v = i < na ? reinterpret_cast<const float4*>(a)[q]
                          : reinterpret_cast<const float4*>(b)[(i - na) / 4];
        __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
        uint2 packed;
        packed.x = *reinterpret_cast<uint32_t*>(&lo);
        packed.y = *reinterpret_cast<uint32_t*>(&hi);
        reinterpret_cast<uint2*>(out)[q] = packed;
    }
    for (size_t i = fours * 4 + first; i < n; i += stride)
        out[i] = __float2bfloat16(i < na ? a[i] : b[i - na]);
}

// SwiGLU's gate on the MLP's hidden rows h = [g | u] (rows, 2 hidden): y = silu(g) u, and its
// backward dg = dy u silu'(g), du = dy silu(g), with silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + __expf(-x)); }

// Rows r = blockIdx.y, blockIdx.y + gridDim.y, ...; within a row, columns (or packs of
// columns) across blockIdx.x and the threads. Packs where the hidden width is a multiple of
// the pack and the pointers are 16-byte aligned (then every row's halves are too).
template <typename T>
__device__ void glu_fwd(const T* h, T* y, size_t rows, int hidden) {
    constexpr int V = Pack<T>::N;
    bool packed = hidden % V == 0 && aligned16(h) && aligned16(y);
    int per_row = packed ? hidden / V : hidden;
    for (size_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* g = h + r * 2 * hidden;
        const T* u = g + hidden;
        T* out = y + r * hidden;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < per_row;
             c += gridDim.x * blockDim.x) {
            if (packed) {
                Pack<T> gk = load_pack(g, c), uk = load_pack(u, c);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    float gv = to_f(gk.v[e]);
                    gk.v[e] = from_f<T>(gv * sigmoid_f(gv) * to_f(uk.v[e]));
                }
                store_pack(out, c, gk);
            } else {
                float gv = to_f(g[c]);
                out[c] = from_f<T>(gv * sigmoid_f(gv) * to_f(u[c]));
            }
        }
    }
}

template <typename T>
__device__ void glu_bwd(const T* h, const T* dy, T* dh, size_t rows, int hidden) {
    constexpr int V = Pack<T>::N;
    bool packed = hidden % V == 0 && aligned16(h) && aligned16(dy) && aligned16(dh);
    int per_row = packed ? hidden / V : hidden;
    for (size_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* g = h + r * 2 * hidden;
        const T* u = g + hidden;
        const T* d = dy + r * hidden;
        T* dg = dh + r * 2 * hidden;
        T* du = dg + hidden;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < per_row;
             c += gridDim.x * blockDim.x) {
            if (packed) {
                Pack<T> gk = load_pack(g, c), uk = load_pack(u, c), dk = load_pack(d, c);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    float gv = to_f(gk.v[e]), uv = to_f(uk.v[e]), dv = to_f(dk.v[e]);
                    float s = sigmoid_f(gv);
                    gk.v[e] = from_f<T>(dv * uv * s * (1.0f + gv * (1.0f - s)));
                    uk.v[e] = from_f<T>(dv * gv * s);
                }
                store_pack(dg, c, gk);
                store_pack(du, c, uk);
            } else {
                float gv = to_f(g[c]), uv = to_f(u[c]), dv = to_f(d[c]);
                float s = sigmoid_f(gv);
                dg[c] = from_f<T>(dv * uv * s * (1.0f + gv * (1.0f - s)));
                du[c] = from_f<T>(dv * gv * s);
            }
        }
    }
}

#define GLU_KERNELS(NAME, T)                                                                  \
    extern "C" __global__ void glu_fwd_##NAME(const T* h, T* y, size_t rows, int hidden) {     \
        glu_fwd<T>(h, y, rows, hidden);                                                       \
    }                                                                                         \
    extern "C" __global__ void glu_bwd_##NAME(const T* h, const T* dy, T* dh, size_t rows,     \
                                              int hidden) {                                   \
        glu_bwd<T>(h, dy, dh, rows, hidden);                                                  \
    }

FOR_DTYPES(GLU_KERNELS)

// Gated attention's gate: out = y sigmoid(g[i / group]); backward, one thread per gate,
// dy = dout s and dg = s (1 - s) sum over its values of dout y, written after dy in `out`.
template <typename T>
__device__ void gate_fwd(const T* y, const T* g, T* out, size_t gates, int group) {
    size_t n = gates * group;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = from_f<T>(to_f(y[i]) * sigmoid_f(to_f(g[i / group])));
}

template <typename T>
__device__ void gate_bwd(const T* y, const T* g, const T* d, T* out, size_t gates, int group) {
    T* dg = out + gates * group;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < gates;
         k += (size_t)gridDim.x * blockDim.x) {
        float s = sigmoid_f(to_f(g[k])), acc = 0.0f;
        for (int e = 0; e < group; ++e) {
            size_t i = k * group + e;
            float dv = to_f(d[i]);
            out[i] = from_f<T>(dv * s);
            acc += dv * to_f(y[i]);
        }
        dg[k] = from_f<T>(acc * s * (1.0f - s));
    }
}

#define GATE_KERNELS(NAME, T)                                                                 \
    extern "C" __global__ void gate_fwd_##NAME(const T* y, const T* g, T* out, size_t gates,   \
                                               int group) {                                   \
        gate_fwd<T>(y, g, out, gates, group);                                                 \
    }                                                                                         \
    extern "C" __global__ void gate_bwd_##NAME(const T* y, const T* g, const T* d, T* out,     \
                                               size_t gates, int group) {                     \
        gate_bwd<T>(y, g, d, out, gates, group);                                              \
    }

FOR_DTYPES(GATE_KERNELS)

// Attention head preparation: a projection's output (B, T, n hd) becomes heads (B, n, T, hd),
// each RMS-normalized (when `norm`) and rotated by RoPE with the tables rot = (cos, sin), each
// (T, hd) f32 (identity tables when a model has no RoPE). Rotate-half pairs channel i with
// i + hd/2: out_i = a cos_i - b sin_i, out_{i+h} = b cos_{i+h} + a sin_{i+h}. One warp per
// (b, t, head); lanes take channel pairs.
template <typename T>
__device__ void head_prep_fwd(const T* y, const float* rot, T* out, int b, int t, int n,
                              int hd, int norm, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= b * t * n) return;
    int h = row % n, tok = (row / n) % t, bi = row / (n * t);
    const T* x = y + (size_t)row * hd;  // (b, tok, h) in (B, T, n, hd)
    T* o = out + (((size_t)bi * n + h) * t + tok) * hd;
    const float* cs = rot + (size_t)tok * hd;
    const float* sn = rot + (size_t)t * hd + (size_t)tok * hd;
    int half = hd / 2, lane = threadIdx.x % 32;
    float r = 1.0f;
    if (norm) {
        float ss = 0.0f;
        for (int i = lane; i < hd; i += 32) ss += to_f(x[i]) * to_f(x[i]);
        for (int k = 16; k > 0; k /= 2) ss += __shfl_xor_sync(0xffffffff, ss, k);
        r = rsqrtf(ss / hd + eps);
    }
    for (int i = lane; i < half; i += 32) {
        float a = to_f(x[i]) * r, c = to_f(x[i + half]) * r;
        o[i] = from_f<T>(a * cs[i] - c * sn[i]);
        o[i + half] = from_f<T>(c * cs[i + half] + a * sn[i + half]);
    }
}

template <typename T>
__device__ void head_prep_bwd(const T* y, const float* rot, const T* dout, T* dy, int b, int t,
                              int n, int hd, int norm, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= b * t * n) return;
    int h = row % n, tok = (row / n) % t, bi = row / (n * t);
    const T* x = y + (size_t)row * hd;
    T* dx = dy + (size_t)row * hd;
    const T* g = dout + (((size_t)bi * n + h) * t + tok) * hd;
    const float* cs = rot + (size_t)tok * hd;
    const float* sn = rot + (size_t)t * hd + (size_t)tok * hd;
    int half = hd / 2, lane = threadIdx.x % 32;
    float r = 1.0f;
    if (norm) {
        float ss = 0.0f;
        for (int i = lane; i < hd; i += 32) ss += to_f(x[i]) * to_f(x[i]);
        for (int k = 16; k > 0; k /= 2) ss += __shfl_xor_sync(0xffffffff, ss, k);
        r = rsqrtf(ss / hd + eps);
    }
    // The rotation's transpose gives dL/d(normalized x); then the norm's backward.
    float dot = 0.0f;
    for (int i = lane; i < half; i += 32) {
        float g1 = to_f(g[i]), g2 = to_f(g[i + half]);
        float da = g1 * cs[i] + g2 * sn[i + half];
        float dc = -g1 * sn[i] + g2 * cs[i + half];
        dot += da * to_f(x[i]) * r + dc * to_f(x[i + half]) * r;
    }
    for (int k = 16; k > 0; k /= 2) dot += __shfl_xor_sync(0xffffffff, dot, k);
    dot /= hd;
    for (int i = lane; i < half; i += 32) {
        float g1 = to_f(g[i]), g2 = to_f(g[i + half]);
        float da = g1 * cs[i] + g2 * sn[i + half];
        float dc = -g1 * sn[i] + g2 * cs[i + half];
        if (norm) {
            dx[i] = from_f<T>(r * (da - to_f(x[i]) * r * dot));
            dx[i + half] = from_f<T>(r * (dc - to_f(x[i + half]) * r * dot));
        } else {
            dx[i] = from_f<T>(da);
            dx[i + half] = from_f<T>(dc);
        }
    }
}

#define HEAD_KERNELS(NAME, T)                                                                 \
    extern "C" __global__ void head_prep_fwd_##NAME(const T* y, const float* rot, T* out,      \
                                                    int b, int t, int n, int hd, int norm,    \
                                                    float eps) {                              \
        head_prep_fwd<T>(y, rot, out, b, t, n, hd, norm, eps);                                \
    }                                                                                         \
    extern "C" __global__ void head_prep_bwd_##NAME(const T* y, const float* rot,              \
                                                    const T* dout, T* dy, int b, int t,       \
                                                    int n, int hd, int norm, float eps) {     \
        head_prep_bwd<T>(y, rot, dout, dy, b, t, n, hd, norm, eps);                           \
    }

FOR_DTYPES(HEAD_KERNELS)

// Multi-stream residual mixing (HC, mHC), per token: the state s is (n, c), coefficients f32.
//   pre-mix:  h[c] = sum_i pre[i] s[i][c]
//   post-mix: y[j][c] = sum_i res[j][i] s[i][c] + post[j] out[c], coef = [res | post] (n, n+1)
// One block per token, threads striding over the channels; the coefficients' gradients (sums
// over the channels) one warp per token, reduced with shuffles. Every kernel comes twice: for
// any n <= MAXN, and for n = 4 (the papers' and the benchmarks'), where the per-token arrays
// have compile-time indices and live in registers (with a run-time n they went to local
// memory: the post-mix coefficients' gradient ran at a seventh of the memory's speed).
// `tokens` is every kernel's last argument.
#define MAXN 8

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

template <typename T, int NN>
__device__ void premix_fwd(const T* s, const float* pre, T* h, int n_arg, int c) {
    const int n = NN ? NN : n_arg;
    size_t tok = blockIdx.x;
    const T* st = s + tok * n * c;
    const float* p = pre + tok * n;
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < (NN ? NN : MAXN); i++)
            if (i < n) acc += p[i] * to_f(st[i * c + ch]);
        h[tok * c + ch] = from_f<T>(acc);
    }
}

// ds[i][c] = pre[i] dh[c], plus add[i][c] where given: the state's gradient so far
// (fused/mix.rs `StateGrad`).
template <typename T, int NN>
__device__ void premix_bwd_s(const float* pre, const T* dh, const T* add, T* ds, int n_arg,
                             int c) {
    const int n = NN ? NN : n_arg;
    size_t tok = blockIdx.x;
    const float* p = pre + tok * n;
    constexpr int V = Pack<T>::N;
    if (c % V == 0 && aligned16(dh) && aligned16(ds) && (!add || aligned16(add))) {
        // 16 bytes a thread: single bf16 loads ran this at a third of the memory's speed.
        int cv = c / V;
        for (int q = threadIdx.x; q < cv; q += blockDim.x) {
            Pack<T> g = load_pack(dh, tok * cv + q);
#pragma unroll
            for (int i = 0; i < (NN ? NN : MAXN); i++) {
                if (i >= n) break;
                size_t at = (tok * n + i) * cv + q;
                Pack<T> a, o;
                a.raw = add ? load_pack(add, at).raw : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int u = 0; u < V; u++)
                    o.v[u] = from_f<T>((add ? to_f(a.v[u]) : 0.0f) + p[i] * to_f(g.v[u]));
                store_pack(ds, at, o);
            }
        }
        return;
    }
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        float g = to_f(dh[tok * c + ch]);
#pragma unroll
        for (int i = 0; i < (NN ? NN : MAXN); i++) {
            if (i >= n) break;
            size_t at = (tok * n + i) * c + ch;
            ds[at] = from_f<T>((add ? to_f(add[at]) : 0.0f) + p[i] * g);
        }
    }
}

// dpre[i] = sum_c s[i][c] dh[c] (f32), a warp a token.
template <typename T, int NN>
__device__ void premix_bwd_pre(const T* s, const T* dh, float* dpre, int n_arg, int c,
                               int tokens) {
    const int n = NN ? NN : n_arg;
    size_t tok = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (tok >= (size_t)tokens) return;
    int lane = threadIdx.x % 32;
    const T* st = s + tok * n * c;
    float acc[MAXN];
#pragma unroll
    for (int i = 0; i < MAXN; i++) acc[i] = 0.0f;
    constexpr int V = Pack<T>::N;
    if (c % V == 0 && aligned16(s) && aligned16(dh)) {
        int cv = c / V;
        for (int q = lane; q < cv; q += 32) {
            Pack<T> g = load_pack(dh, tok * cv + q);
#pragma unroll
            for (int i = 0; i < (NN ? NN : MAXN); i++) {
                if (i >= n) break;
                Pack<T> x = load_pack(s, (tok * n + i) * cv + q);
#pragma unroll
                for (int u = 0; u < V; u++) acc[i] += to_f(x.v[u]) * to_f(g.v[u]);
            }
        }
    } else {
        for (int ch = lane; ch < c; ch += 32) {
            float g = to_f(dh[tok * c + ch]);
#pragma unroll
            for (int i = 0; i < (NN ? NN : MAXN); i++)
                if (i < n) acc[i] += to_f(st[i * c + ch]) * g;
        }
    }
#pragma unroll
    for (int i = 0; i < (NN ? NN : MAXN); i++) {
        float v = warp_sum(acc[i]);
        if (i < n && lane == 0) dpre[tok * n + i] = v;
    }
}

template <typename T, int NN>
__device__ void postmix_fwd(const T* s, const float* coef, const T* out, T* y, int n_arg, int c) {
    const int n = NN ? NN : n_arg;
    size_t tok = blockIdx.x;
    const T* st = s + tok * n * c;
    const float* k = coef + tok * n * (n + 1);
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        float x[MAXN];
#pragma unroll
        for (int i = 0; i < (NN ? NN : MAXN); i++) x[i] = i < n ? to_f(st[i * c + ch]) : 0.0f;
        float o = to_f(out[tok * c + ch]);
#pragma unroll
        for (int j = 0; j < (NN ? NN : MAXN); j++) {
            if (j >= n) break;
            float acc = k[j * (n + 1) + n] * o;
#pragma unroll
            for (int i = 0; i < (NN ? NN : MAXN); i++)
                if (i < n) acc += k[j * (n + 1) + i] * x[i];
            y[(tok * n + j) * c + ch] = from_f<T>(acc);
        }
    }
}

// From dy (n, c): ds[i][c] = sum_j res[j][i] dy[j][c] and dout[c] = sum_j post[j] dy[j][c].
// g holds every token's ds (tokens, n, c) and then every token's dout (tokens, c), so that
// both are contiguous pieces of it (one block a token: tokens = gridDim.x).
template <typename T, int NN>
__device__ void postmix_bwd_g(const float* coef, const T* dy, T* g, int n_arg, int c) {
    const int n = NN ? NN : n_arg;
    size_t tok = blockIdx.x;
    const float* k = coef + tok * n * (n + 1);
    T* dout = g + (size_t)gridDim.x * n * c;
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        float d[MAXN];
#pragma unroll
        for (int j = 0; j < (NN ? NN : MAXN); j++)
            d[j] = j < n ? to_f(dy[(tok * n + j) * c + ch]) : 0.0f;
#pragma unroll
        for (int i = 0; i <= (NN ? NN : MAXN); i++) {
            if (i > n) break;
            float acc = 0.0f;
#pragma unroll
            for (int j = 0; j < (NN ? NN : MAXN); j++)
                if (j < n) acc += k[j * (n + 1) + i] * d[j];
            if (i < n)
                g[(tok * n + i) * c + ch] = from_f<T>(acc);
            else
                dout[tok * c + ch] = from_f<T>(acc);
        }
    }
}

// dcoef[j][i] = sum_c dy[j][c] s[i][c], dcoef[j][n] = sum_c dy[j][c] out[c] (f32), a warp a
// token.
template <typename T, int NN>
__device__ void postmix_bwd_coef(const T* s, const T* out, const T* dy, float* dcoef, int n_arg,
                                 int c, int tokens) {
    const int n = NN ? NN : n_arg;
    constexpr int NM = NN ? NN : MAXN;
    size_t tok = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (tok >= (size_t)tokens) return;
    int lane = threadIdx.x % 32;
    const T* st = s + tok * n * c;
    float acc[NM * (NM + 1)];
#pragma unroll
    for (int q = 0; q < NM * (NM + 1); q++) acc[q] = 0.0f;
    constexpr int V = Pack<T>::N;
    bool vec = c % V == 0 && aligned16(s) && aligned16(out) && aligned16(dy);
    for (int q = lane; vec && q < c / V; q += 32) {
        int cv = c / V;
        Pack<T> xp[NM + 1], dp[NM];
#pragma unroll
        for (int i = 0; i < NM; i++) {
            xp[i].raw = i < n ? load_pack(s, (tok * n + i) * cv + q).raw : make_uint4(0, 0, 0, 0);
            dp[i].raw = i < n ? load_pack(dy, (tok * n + i) * cv + q).raw : make_uint4(0, 0, 0, 0);
        }
        xp[NM] = load_pack(out, tok * cv + q);
#pragma unroll
        for (int u = 0; u < V; u++) {
#pragma unroll
            for (int j = 0; j < NM; j++) {
                float d = to_f(dp[j].v[u]);
#pragma unroll
                for (int i = 0; i <= NM; i++) acc[j * (NM + 1) + i] += d * to_f(xp[i].v[u]);
            }
        }
    }
    for (int ch = lane; !vec && ch < c; ch += 32) {
        float x[NM + 1];
#pragma unroll
        for (int i = 0; i < NM; i++) x[i] = i < n ? to_f(st[i * c + ch]) : 0.0f;
        x[NM] = to_f(out[tok * c + ch]);
#pragma unroll
        for (int j = 0; j < NM; j++) {
            float d = j < n ? to_f(dy[(tok * n + j) * c + ch]) : 0.0f;
#pragma unroll
            for (int i = 0; i <= NM; i++) acc[j * (NM + 1) + i] += d * x[i];
        }
    }
    // acc[j][NM] holds the out column; token row j's n + 1 entries are [s_0.. s_{n-1}, out].
    float* dst = dcoef + tok * n * (n + 1);
#pragma unroll
    for (int j = 0; j < NM; j++) {
#pragma unroll
        for (int i = 0; i <= NM; i++) {
            float v = warp_sum(acc[j * (NM + 1) + i]);
            if (lane == 0 && j < n) {
                if (i < n) dst[j * (n + 1) + i] = v;
                else if (i == NM) dst[j * (n + 1) + n] = v;
            }
        }
    }
}

// The post-mix's whole backward pass in one read of dy, a warp a token: postmix_bwd_g's ds
// and dout (into g, laid out as there) and postmix_bwd_coef's dcoef, which read dy twice
// between them. The token's coefficients sit in registers.
template <typename T, int NN>
__device__ void postmix_bwd_all(const float* coef, const T* s, const T* out, const T* dy, T* g,
                                float* dcoef, int n_arg, int c, int tokens) {
    const int n = NN ? NN : n_arg;
    constexpr int NM = NN ? NN : MAXN;
    size_t tok = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (tok >= (size_t)tokens) return;
    int lane = threadIdx.x % 32;
    T* dout = g + (size_t)tokens * n * c;
    float kk[NM * (NM + 1)];  // kk[j][i], row j's n + 1 entries at stride NM + 1
#pragma unroll
    for (int j = 0; j < NM; j++)
#pragma unroll
        for (int i = 0; i <= NM; i++) {
            int src = i < NM ? i : n;  // the post column sits at n in coef, at NM here
            kk[j * (NM + 1) + i] =
                (j < n && (i < n || i == NM)) ? coef[(tok * n + j) * (n + 1) + src] : 0.0f;
        }
    float acc[NM * (NM + 1)];
#pragma unroll
    for (int q = 0; q < NM * (NM + 1); q++) acc[q] = 0.0f;
    constexpr int V = Pack<T>::N;
    // With C whole packs, dout (after every token's ds) starts on 16 bytes as g does.
    bool vec = c % V == 0 && aligned16(s) && aligned16(out) && aligned16(dy) && aligned16(g);
    for (int q = lane; vec && q < c / V; q += 32) {
        int cv = c / V;
        Pack<T> xp[NM + 1], dp[NM];
#pragma unroll
        for (int i = 0; i < NM; i++) {
            xp[i].raw = i < n ? load_pack(s, (tok * n + i) * cv + q).raw : make_uint4(0, 0, 0, 0);
            dp[i].raw = i < n ? load_pack(dy, (tok * n + i) * cv + q).raw : make_uint4(0, 0, 0, 0);
        }
        xp[NM] = load_pack(out, tok * cv + q);
        float d[NM][V];
#pragma unroll
        for (int j = 0; j < NM; j++)
#pragma unroll
            for (int u = 0; u < V; u++) d[j][u] = to_f(dp[j].v[u]);
#pragma unroll
        for (int u = 0; u < V; u++)
#pragma unroll
            for (int j = 0; j < NM; j++)
#pragma unroll
                for (int i = 0; i <= NM; i++) acc[j * (NM + 1) + i] += d[j][u] * to_f(xp[i].v[u]);
#pragma unroll
        for (int i = 0; i <= NM; i++) {
            if (i < NM && i >= n) continue;
            Pack<T> o;
#pragma unroll
            for (int u = 0; u < V; u++) {
                float a = 0.0f;
#pragma unroll
                for (int j = 0; j < NM; j++) a += kk[j * (NM + 1) + i] * d[j][u];
                o.v[u] = from_f<T>(a);
            }
            if (i < NM)
                store_pack(g, (tok * n + i) * cv + q, o);
            else
                store_pack(dout, tok * cv + q, o);
        }
    }
    for (int ch = lane; !vec && ch < c; ch += 32) {
        float x[NM + 1], d[NM];
#pragma unroll
        for (int i = 0; i < NM; i++) {
            x[i] = i < n ? to_f(s[(tok * n + i) * c + ch]) : 0.0f;
            d[i] = i < n ? to_f(dy[(tok * n + i) * c + ch]) : 0.0f;
        }
        x[NM] = to_f(out[tok * c + ch]);
#pragma unroll
        for (int j = 0; j < NM; j++)
#pragma unroll
            for (int i = 0; i <= NM; i++) acc[j * (NM + 1) + i] += d[j] * x[i];
#pragma unroll
        for (int i = 0; i <= NM; i++) {
            if (i < NM && i >= n) continue;
            float a = 0.0f;
#pragma unroll
            for (int j = 0; j < NM; j++) a += kk[j * (NM + 1) + i] * d[j];
            if (i < NM)
                g[(tok * n + i) * c + ch] = from_f<T>(a);
            else
                dout[tok * c + ch] = from_f<T>(a);
        }
    }
    float* dst = dcoef + tok * n * (n + 1);
#pragma unroll
    for (int j = 0; j < NM; j++) {
#pragma unroll
        for (int i = 0; i <= NM; i++) {
            float v = warp_sum(acc[j * (NM + 1) + i]);
            if (lane == 0 && j < n) {
                if (i < n) dst[j * (n + 1) + i] = v;
                else if (i == NM) dst[j * (n + 1) + n] = v;
            }
        }
    }
}

#define MIX_KERNELS_N(NAME, T, NN, SUF)                                                       \
    extern "C" __global__ void premix_fwd##SUF##_##NAME(const T* s, const float* pre, T* h,    \
                                                        int n, int c, int tokens) {           \
        premix_fwd<T, NN>(s, pre, h, n, c);                                                   \
    }                                                                                         \
    extern "C" __global__ void premix_bwd_s##SUF##_##NAME(const float* pre, const T* dh,       \
                                                          T* ds, int n, int c, int tokens) {  \
        premix_bwd_s<T, NN>(pre, dh, nullptr, ds, n, c);                                      \
    }                                                                                         \
    extern "C" __global__ void premix_bwd_sa##SUF##_##NAME(                                   \
        const float* pre, const T* dh, const T* add, T* ds, int n, int c, int tokens) {       \
        premix_bwd_s<T, NN>(pre, dh, add, ds, n, c);                                          \
    }                                                                                         \
    extern "C" __global__ void premix_bwd_pre##SUF##_##NAME(const T* s, const T* dh,           \
                                                            float* dpre, int n, int c,        \
                                                            int tokens) {                     \
        premix_bwd_pre<T, NN>(s, dh, dpre, n, c, tokens);                                     \
    }                                                                                         \
    extern "C" __global__ void postmix_fwd##SUF##_##NAME(const T* s, const float* coef,        \
                                                         const T* out, T* y, int n, int c,    \
                                                         int tokens) {                        \
        postmix_fwd<T, NN>(s, coef, out, y, n, c);                                            \
    }                                                                                         \
    extern "C" __global__ void postmix_bwd_g##SUF##_##NAME(const float* coef, const T* dy,     \
                                                           T* g, int n, int c, int tokens) {  \
        postmix_bwd_g<T, NN>(coef, dy, g, n, c);                                              \
    }                                                                                         \
    extern "C" __global__ void postmix_bwd_coef##SUF##_##NAME(                                \
        const T* s, const T* out, const T* dy, float* dcoef, int n, int c, int tokens) {      \
        postmix_bwd_coef<T, NN>(s, out, dy, dcoef, n, c, tokens);                             \
    }                                                                                         \
    extern "C" __global__ void postmix_bwd_all##SUF##_##NAME(                                 \
        const float* coef, const T* s, const T* out, const T* dy, T* g, float* dcoef, int n,  \
        int c, int tokens) {                                                                  \
        postmix_bwd_all<T, NN>(coef, s, out, dy, g, dcoef, n, c, tokens);                     \
    }
#define MIX_KERNELS(NAME, T) MIX_KERNELS_N(NAME, T, 0, ) MIX_KERNELS_N(NAME, T, 4, _n4)

FOR_DTYPES(MIX_KERNELS)

// Sinkhorn-Knopp for mHC (residual/mod.rs `sinkhorn`), one thread per token's n x n logits:
// a log-domain column then row normalization, exp, then iters - 1 rounds of dividing columns
// by their sums and rows by theirs. The backward pass recomputes the rounds, keeping each
// round's matrices and sums, and runs them in reverse. At most 4 streams and 32 rounds.
#define SK_N 4
#define SK_IT 32

struct SkRound {
    float c[SK_N * SK_N], colsum[SK_N], m[SK_N * SK_N], rowsum[SK_N];
};

// Forward from logits l into m0 (after exp) and the rounds; returns nothing, fills `out`.
// With `keep` false every round reuses rounds[0] (the forward kernel, which needs none of
// them afterwards, so its thread's scratch stays small enough for the L1 cache).
__device__ void sk_forward(const float* l, int n, int iters, float* a_exp, float* m0,
                           SkRound* rounds, float* out, bool keep) {
    float a[SK_N * SK_N];
    for (int j = 0; j < n; j++) {  // columns: subtract log-sum-exp
        float mx = -INFINITY, s = 0.0f;
        for (int i = 0; i < n; i++) mx = fmaxf(mx, l[i * n + j]);
        for (int i = 0; i < n; i++) s += expf(l[i * n + j] - mx);
        float lse = mx + logf(s);
        for (int i = 0; i < n; i++) {
            a[i * n + j] = l[i * n + j] - lse;
            a_exp[i * n + j] = expf(a[i * n + j]);
        }
    }
    for (int i = 0; i < n; i++) {  // rows
        float mx = -INFINITY, s = 0.0f;
        for (int j = 0; j < n; j++) mx = fmaxf(mx, a[i * n + j]);
        for (int j = 0; j < n; j++) s += expf(a[i * n + j] - mx);
        float lse = mx + logf(s);
        for (int j = 0; j < n; j++) m0[i * n + j] = expf(a[i * n + j] - lse);
    }
    const float* prev = m0;
    for (int k = 0; k + 1 < iters; k++) {
        SkRound* r = &rounds[keep ? k : 0];
        for (int j = 0; j < n; j++) {
            float s = 0.0f;
            for (int i = 0; i < n; i++) s += prev[i * n + j];
            r->colsum[j] = s;
            for (int i = 0; i < n; i++) r->c[i * n + j] = prev[i * n + j] / s;
        }
        for (int i = 0; i < n; i++) {
            float s = 0.0f;
            for (int j = 0; j < n; j++) s += r->c[i * n + j];
            r->rowsum[i] = s;
            for (int j = 0; j < n; j++) r->m[i * n + j] = r->c[i * n + j] / s;
        }
        prev = r->m;
    }
    for (int q = 0; q < n * n; q++) out[q] = prev[q];
}

extern "C" __global__ void sinkhorn_fwd(const float* logits, float* out, int tokens, int n,
                                        int iters) {
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= tokens) return;
    float a_exp[SK_N * SK_N], m0[SK_N * SK_N];
    SkRound round;
    sk_forward(logits + (size_t)tok * n * n, n, iters, a_exp, m0, &round,
               out + (size_t)tok * n * n, false);
}

// dl of one token's logits l from dout: the rounds recomputed, then run in reverse.
__device__ void sk_backward(const float* l, const float* dout, float* dl, int n, int iters) {
    float a_exp[SK_N * SK_N], m0[SK_N * SK_N], y[SK_N * SK_N];
    SkRound rounds[SK_IT];
    sk_forward(l, n, iters, a_exp, m0, rounds, y, true);
    float g[SK_N * SK_N];
    for (int q = 0; q < n * n; q++) g[q] = dout[q];
    // y = x / s along an axis: dx = (dy - sum(dy y)) / s along it.
    for (int k = iters - 2; k >= 0; k--) {
        SkRound* r = &rounds[k];
        for (int i = 0; i < n; i++) {  // rows of m = c / rowsum
            float d = 0.0f;
            for (int j = 0; j < n; j++) d += g[i * n + j] * r->m[i * n + j];
            for (int j = 0; j < n; j++) g[i * n + j] = (g[i * n + j] - d) / r->rowsum[i];
        }
        for (int j = 0; j < n; j++) {  // columns of c = prev / colsum
            float d = 0.0f;
            for (int i = 0; i < n; i++) d += g[i * n + j] * r->c[i * n + j];
            for (int i = 0; i < n; i++) g[i * n + j] = (g[i * n + j] - d) / r->colsum[j];
        }
    }
    // m0 = exp(b), b = a - lse_row(a): db = dm0 m0; da = db - m0 sum_row(db) (m0 is the
    // rows' softmax of a).
    for (int i = 0; i < n; i++) {
        float s = 0.0f;
        for (int j = 0; j < n; j++) {
            g[i * n + j] *= m0[i * n + j];
            s += g[i * n + j];
        }
        for (int j = 0; j < n; j++) g[i * n + j] -= m0[i * n + j] * s;
    }
    // a = l - lse_col(l): dl = da - exp(a) sum_col(da) (exp(a) is the columns' softmax of l).
    for (int j = 0; j < n; j++) {
        float s = 0.0f;
        for (int i = 0; i < n; i++) s += g[i * n + j];
        for (int i = 0; i < n; i++) dl[i * n + j] = g[i * n + j] - a_exp[i * n + j] * s;
    }
}

extern "C" __global__ void sinkhorn_bwd(const float* logits, const float* dout, float* dl,
                                        int tokens, int n, int iters) {
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= tokens) return;
    size_t at = (size_t)tok * n * n;
    sk_backward(logits + at, dout + at, dl + at, n, iters);
}

// mHC's per-token coefficients (fused/stream_coef.rs) from its logits z (rows of w >= 2n + n^2)
// and the packed parameters p = [a (3) | b_pre (n) | b_post (n) | b_res (n^2)], one thread a
// token: pre = sigmoid(a0 z_pre + b_pre) (n); coef = [res | post] (n, n + 1) with
// post = 2 sigmoid(a1 z_post + b_post) and res = Sinkhorn(a2 z_res + b_res). The backward
// kernels write a row of w + P: z's gradient, then the token's part of p's (summed over
// tokens by the caller), into an output the launch zero-fills: each thread writes only its
// own columns, where its loop over a whole row of zeros was a store 4 bytes wide at every
// row's stride, the slowest of these kernels' passes.
__device__ __forceinline__ float sigmoid_t(float v) { return 0.5f * (tanhf(0.5f * v) + 1.0f); }

extern "C" __global__ void mhc_pre_fwd(const float* z, const float* p, float* pre, int tokens,
                                       int n, int w, int iters) {
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= tokens) return;
    const float* zr = z + (size_t)tok * w;
    for (int i = 0; i < n; i++) pre[(size_t)tok * n + i] = sigmoid_t(p[0] * zr[i] + p[3 + i]);
}

extern "C" __global__ void mhc_pre_bwd(const float* z, const float* p, const float* dpre,
                                       float* out, int tokens, int n, int w, int iters) {
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= tokens) return;
    const float* zr = z + (size_t)tok * w;
    int np = 3 + 2 * n + n * n;
    float* o = out + (size_t)tok * (w + np);
    float da = 0.0f;
    for (int i = 0; i < n; i++) {
        float s = sigmoid_t(p[0] * zr[i] + p[3 + i]);
        float dl = dpre[(size_t)tok * n + i] * s * (1.0f - s);
        o[i] = p[0] * dl;
        da += dl * zr[i];
        o[w + 3 + i] = dl;
    }
    o[w] = da;
}

extern "C" __global__ void mhc_res_fwd(const float* z, const float* p, float* coef, int tokens,
                                       int n, int w, int iters) {
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= tokens) return;
    const float* zr = z + (size_t)tok * w;
    float l[SK_N * SK_N], res[SK_N * SK_N], a_exp[SK_N * SK_N], m0[SK_N * SK_N];
    for (int q = 0; q < n * n; q++) l[q] = p[2] * zr[2 * n + q] + p[3 + 2 * n + q];
    SkRound round;
    sk_forward(l, n, iters, a_exp, m0, &round, res, false);
    float* c = coef + (size_t)tok * n * (n + 1);
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) c[i * (n + 1) + j] = res[i * n + j];
        c[i * (n + 1) + n] = 2.0f * sigmoid_t(p[1] * zr[n + i] + p[3 + n + i]);
    }
}

extern "C" __global__ void mhc_res_bwd(const float* z, const float* p, const float* dcoef,
                                       float* out, int tokens, int n, int w, int iters) {
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= tokens) return;
    const float* zr = z + (size_t)tok * w;
    const float* dc = dcoef + (size_t)tok * n * (n + 1);
    int np = 3 + 2 * n + n * n;
    float* o = out + (size_t)tok * (w + np);
    float l[SK_N * SK_N], dres[SK_N * SK_N], dl[SK_N * SK_N];
    for (int q = 0; q < n * n; q++) {
        l[q] = p[2] * zr[2 * n + q] + p[3 + 2 * n + q];
        dres[q] = dc[(q / n) * (n + 1) + q % n];
    }
    sk_backward(l, dres, dl, n, iters);
    float da1 = 0.0f, da2 = 0.0f;
    for (int i = 0; i < n; i++) {
        float s = sigmoid_t(p[1] * zr[n + i] + p[3 + n + i]);
        float d = dc[i * (n + 1) + n] * 2.0f * s * (1.0f - s);
        o[n + i] = p[1] * d;
        da1 += d * zr[n + i];
        o[w + 3 + n + i] = d;
    }
    for (int q = 0; q < n * n; q++) {
        o[2 * n + q] = p[2] * dl[q];
        da2 += dl[q] * zr[2 * n + q];
        o[w + 3 + 2 * n + q] = dl[q];
    }
    o[w + 1] = da1;
    o[w + 2] = da2;
}

// Dynamic HC's coefficients (fused/stream_coef.rs), one thread a token, z as n stream rows
// of r = w / n logits: pre_i = p0 tanh(z[i][0]) + p[2 + i], post_j = p1 tanh(z[j][1]) +
// p[2 + n + j], res[j][i] = p0 tanh(z[i][2 + j]) + p[2 + 2n + n i + j].
extern "C" __global__ void hc_pre_fwd(const float* z, const float* p, float* pre, int tokens,
                                      int n, int w, int iters) {
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= tokens) return;
    const float* zr = z + (size_t)tok * w;
    int r = w / n;
    for (int i = 0; i < n; i++) pre[(size_t)tok * n + i] = p[0] * tanhf(zr[i * r]) + p[2 + i];
}

extern "C" __global__ void hc_pre_bwd(const float* z, const float* p, const float* dpre,
                                      float* out, int tokens, int n, int w, int iters) {
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= tokens) return;
    const float* zr = z + (size_t)tok * w;
    int r = w / n, np = 2 + 2 * n + n * n;
    float* o = out + (size_t)tok * (w + np);
    float ds = 0.0f;
    for (int i = 0; i < n; i++) {
        float u = tanhf(zr[i * r]), g = dpre[(size_t)tok * n + i];
        o[i * r] = p[0] * g * (1.0f - u * u);
        ds += g * u;
        o[w + 2 + i] = g;
    }
    o[w] = ds;
}

extern "C" __global__ void hc_res_fwd(const float* z, const float* p, float* coef, int tokens,
                                      int n, int w, int iters) {
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= tokens) return;
    const float* zr = z + (size_t)tok * w;
    int r = w / n;
    float* c = coef + (size_t)tok * n * (n + 1);
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < n; i++)
            c[j * (n + 1) + i] = p[0] * tanhf(zr[i * r + 2 + j]) + p[2 + 2 * n + i * n + j];
        c[j * (n + 1) + n] = p[1] * tanhf(zr[j * r + 1]) + p[2 + n + j];
    }
}

extern "C" __global__ void hc_res_bwd(const float* z, const float* p, const float* dcoef,
                                      float* out, int tokens, int n, int w, int iters) {
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= tokens) return;
    const float* zr = z + (size_t)tok * w;
    const float* dc = dcoef + (size_t)tok * n * (n + 1);
    int r = w / n, np = 2 + 2 * n + n * n;
    float* o = out + (size_t)tok * (w + np);
    float da = 0.0f, db = 0.0f;
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < n; i++) {
            float g = dc[j * (n + 1) + i], u = tanhf(zr[i * r + 2 + j]);
            o[i * r + 2 + j] = p[0] * g * (1.0f - u * u);
            da += g * u;
            o[w + 2 + 2 * n + i * n + j] = g;
        }
        float g = dc[j * (n + 1) + n], u = tanhf(zr[j * r + 1]);
        o[j * r + 1] = p[1] * g * (1.0f - u * u);
        db += g * u;
        o[w + 2 + n + j] = g;
    }
    o[w] = da;
    o[w + 1] = db;
}

// The same for 4 streams with a token's 4 x 4 matrix spread over 16 threads, one element
// each, lane 4 i + j of the token's 16 holding row i, column j: row sums are the shuffles
// across lanes 1 and 2 apart, column sums across 4 and 8, and a warp serves 2 tokens. Each
// thread's chain of Sinkhorn's rounds is then a quarter of a thread-a-row kernel's (at 8192
// tokens that one left a multiprocessor 8 warps, each waiting on its own divisions), and the
// GPU holds 16 times the threads of the token-a-thread kernels above. The backward pass
// keeps each round's element, row sum and column sum (3 floats) in local memory.
#define E16 4

__device__ __forceinline__ float row_sum16(float v) {
    v += __shfl_xor_sync(0xffffffff, v, 1);
    return v + __shfl_xor_sync(0xffffffff, v, 2);
}

__device__ __forceinline__ float col_sum16(float v) {
    v += __shfl_xor_sync(0xffffffff, v, 4);
    return v + __shfl_xor_sync(0xffffffff, v, 8);
}

__device__ __forceinline__ float row_max16(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}

__device__ __forceinline__ float col_max16(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 4));
    return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 8));
}

struct Sk16Rounds {
    float m[SK_IT], rowsum[SK_IT], colsum[SK_IT];
};

// This lane's element of Sinkhorn's result from its logit l (sk_forward's arithmetic):
// a_exp and m0 of the first, log-domain, round; with `rounds`, every later round's state.
__device__ __forceinline__ float sk16_forward(float l, int iters, float* a_exp, float* m0,
                                              Sk16Rounds* rounds) {
    float mx = col_max16(l);
    float a = l - (mx + logf(col_sum16(expf(l - mx))));
    *a_exp = expf(a);
    float mr = row_max16(a);
    float prev = expf(a - (mr + logf(row_sum16(expf(a - mr)))));
    *m0 = prev;
    for (int k = 0; k + 1 < iters; k++) {
        float colsum = col_sum16(prev);
        float c = prev / colsum;
        float rowsum = row_sum16(c);
        prev = c / rowsum;
        if (rounds) {
            rounds->m[k] = prev;
            rounds->colsum[k] = colsum;
            rounds->rowsum[k] = rowsum;
        }
    }
    return prev;
}

// dl from dout at this lane's element, as sk_backward; c = m rowsum is rebuilt from the round.
__device__ __forceinline__ float sk16_backward(float l, float dout, int iters) {
    float a_exp, m0;
    Sk16Rounds rounds;
    sk16_forward(l, iters, &a_exp, &m0, &rounds);
    float g = dout;
    for (int k = iters - 2; k >= 0; k--) {
        float m = rounds.m[k], rs = rounds.rowsum[k];
        g = (g - row_sum16(g * m)) / rs;
        g = (g - col_sum16(g * m * rs)) / rounds.colsum[k];
    }
    g *= m0;
    g -= m0 * row_sum16(g);
    return g - a_exp * col_sum16(g);
}

extern "C" __global__ void mhc_res_fwd16(const float* z, const float* p, float* coef, int tokens,
                                         int n_arg, int w, int iters) {
    const int n = E16;
    int q = blockIdx.x * blockDim.x + threadIdx.x, e = q % 16, i = e / n, j = e % n;
    bool live = q / 16 < tokens;
    int tok = live ? q / 16 : tokens - 1;  // lanes past the end compute the last token, unwritten
    const float* zr = z + (size_t)tok * w;
    float a_exp, m0;
    float res = sk16_forward(p[2] * zr[2 * n + e] + p[3 + 2 * n + e], iters, &a_exp, &m0, nullptr);
    if (!live) return;
    float* c = coef + (size_t)tok * n * (n + 1) + i * (n + 1);
    c[j] = res;
    if (j == 0) c[n] = 2.0f * sigmoid_t(p[1] * zr[n + i] + p[3 + n + i]);
}

// Lane e of a token's 16 writes its element's columns of the output row (mhc_res_bwd's
// layout), lanes 4 i the row's post and pre columns, lane 0 the token's a.
extern "C" __global__ void mhc_res_bwd16(const float* z, const float* p, const float* dcoef,
                                         float* out, int tokens, int n_arg, int w, int iters) {
    const int n = E16, np = 3 + 2 * n + n * n;
    int q = blockIdx.x * blockDim.x + threadIdx.x, e = q % 16, i = e / n, j = e % n;
    bool live = q / 16 < tokens;
    int tok = live ? q / 16 : tokens - 1;
    const float* zr = z + (size_t)tok * w;
    const float* dc = dcoef + (size_t)tok * n * (n + 1) + i * (n + 1);
    float zl = zr[2 * n + e];
    float dl = sk16_backward(p[2] * zl + p[3 + 2 * n + e], dc[j], iters);
    float d = 0.0f;
    if (j == 0) {
        float s = sigmoid_t(p[1] * zr[n + i] + p[3 + n + i]);
        d = dc[n] * 2.0f * s * (1.0f - s);
    }
    float da1 = col_sum16(row_sum16(d * zr[n + i]));
    float da2 = col_sum16(row_sum16(dl * zl));
    if (!live) return;
    float* o = out + (size_t)tok * (w + np);
    o[2 * n + e] = p[2] * dl;
    o[w + 3 + 2 * n + e] = dl;
    if (j == 0) {
        o[n + i] = p[1] * d;
        o[w + 3 + n + i] = d;
    }
    if (e == 0) {
        o[w + 1] = da1;
        o[w + 2] = da2;
    }
}

// The two coefficient ops' backward rows a and b (rows, w + np) into [dp (np) | dz (rows w)]
// (fused/coef_grads.rs): dz = a + b on the logits' columns, by every thread of the grid, and
// block x's partial of dp over its rows, warp r of 8 taking rows r, r + 8, ..., lane c the
// columns c, c + 32, ...; coef_grads_final adds the blocks' partials in order. Without b (and
// with w = 0), the token sums of a alone (static HC's coefficient gradients).
extern "C" __global__ void coef_grads_part(const float* a, const float* b, float* out,
                                           float* partial, int rows, int w, int np) {
    __shared__ float acc[8][32];
    int width = w + np;
    float* dz = out + np;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < (size_t)rows * w;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t r = e / w, c = e % w;
        dz[e] = a[r * width + c] + (b ? b[r * width + c] : 0.0f);
    }
    int per = (rows + gridDim.x - 1) / gridDim.x;
    int r0 = blockIdx.x * per, r1 = min(rows, r0 + per);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int c0 = 0; c0 < np; c0 += 32) {
        int c = c0 + lane;
        float s = 0.0f;
        if (c < np)
            for (int r = r0 + warp; r < r1; r += 8)
                s += a[(size_t)r * width + w + c] + (b ? b[(size_t)r * width + w + c] : 0.0f);
        acc[warp][lane] = s;
        __syncthreads();
        if (warp == 0 && c < np) {
            float t = 0.0f;
#pragma unroll
            for (int q = 0; q < 8; q++) t += acc[q][lane];
            partial[(size_t)blockIdx.x * np + c] = t;
        }
        __syncthreads();
    }
}

extern "C" __global__ void coef_grads_final(const float* partial, float* out, int blocks, int np) {
    for (int c = threadIdx.x; c < np; c += blockDim.x) {
        float s = 0.0f;
        for (int q = 0; q < blocks; q++) s += partial[(size_t)q * np + c];
        out[c] = s;
    }
}

// The n streams of a state (tokens, n, C) summed, times `scale`, into (tokens, C), and a
// (tokens, C) tensor spread, times `scale`, over n streams (fused/streams.rs): mHC's merge
// and replicate, and each other's backward. Candle's reduction over a size-n axis and its
// strided broadcast copy took 0.5 and 0.7 ms at the Goedel-1B shape; these are one pass
// each, 16 bytes a thread where C allows.
template <typename T>
__device__ void streams_sum(const T* x, T* y, size_t tokens, int n, int c, float scale) {
    constexpr int V = Pack<T>::N;
    bool vec = c % V == 0 && aligned16(x) && aligned16(y);
    int per = vec ? c / V : c;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < tokens * per;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t tok = e / per;
        int q = e % per;
        if (vec) {
            float acc[V] = {};
            for (int i = 0; i < n; i++) {
                Pack<T> v = load_pack(x, (tok * n + i) * per + q);
#pragma unroll
                for (int u = 0; u < V; u++) acc[u] += to_f(v.v[u]);
            }
            Pack<T> o;
#pragma unroll
            for (int u = 0; u < V; u++) o.v[u] = from_f<T>(acc[u] * scale);
            store_pack(y, tok * per + q, o);
        } else {
            float acc = 0.0f;
            for (int i = 0; i < n; i++) acc += to_f(x[(tok * n + i) * c + q]);
            y[tok * c + q] = from_f<T>(acc * scale);
        }
    }
}

template <typename T>
__device__ void streams_spread(const T* y, T* x, size_t tokens, int n, int c, float scale) {
    constexpr int V = Pack<T>::N;
    bool vec = c % V == 0 && aligned16(x) && aligned16(y);
    int per = vec ? c / V : c;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < tokens * per;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t tok = e / per;
        int q = e % per;
        if (vec) {
            Pack<T> v = load_pack(y, e), o;
#pragma unroll
            for (int u = 0; u < V; u++) o.v[u] = from_f<T>(to_f(v.v[u]) * scale);
            for (int i = 0; i < n; i++) store_pack(x, (tok * n + i) * per + q, o);
        } else {
            T v = from_f<T>(to_f(y[e]) * scale);
            for (int i = 0; i < n; i++) x[(tok * n + i) * c + q] = v;
        }
    }
}

#define STREAMS_KERNELS(NAME, T)                                                              \
    extern "C" __global__ void streams_sum_##NAME(const T* x, T* y, size_t tokens, int n,     \
                                                  int c, float scale) {                       \
        streams_sum<T>(x, y, tokens, n, c, scale);                                            \
    }                                                                                         \
    extern "C" __global__ void streams_spread_##NAME(const T* y, T* x, size_t tokens, int n,  \
                                                     int c, float scale) {                    \
        streams_spread<T>(y, x, tokens, n, c, scale);                                         \
    }

FOR_DTYPES(STREAMS_KERNELS)

// AdamW's update in place, f32, one kernel per tensor:
//   mode 0: m = p0 m + p1 g          (a = g)
//   mode 1: v = p0 v + p1 g^2        (a = g)
//   mode 2: w = p0 w - p1 (m / p2) / (sqrt(v / p3) + p4)   (a = m, b = v)
extern "C" __global__ void adam_update(float* dst, const float* a, const float* b, size_t n,
                                       int mode, float p0, float p1, float p2, float p3,
                                       float p4) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        if (mode == 0) dst[i] = p0 * dst[i] + p1 * a[i];
        else if (mode == 1) dst[i] = p0 * dst[i] + p1 * a[i] * a[i];
        else dst[i] = p0 * dst[i] - p1 * (a[i] / p2) / (sqrtf(b[i] / p3) + p4);
    }
}

// AdamW over every parameter in one launch (adam.rs `adam_step`): block i takes chunk i,
// table[5 i ..] = (w, m, v, g, len | decays << 32), and updates its len values in place with
// the arithmetic of adam_update's three modes, the gradient scaled by `gs` (clipping) first.
extern "C" __global__ void adam_multi(const uint64_t* table, float b1, float b2, float lr,
                                      float bias1, float bias2, float eps, float decay,
                                      float gs) {
    const uint64_t* c = table + 5 * (size_t)blockIdx.x;
    float* __restrict__ w = reinterpret_cast<float*>(c[0]);
    float* __restrict__ m = reinterpret_cast<float*>(c[1]);
    float* __restrict__ v = reinterpret_cast<float*>(c[2]);
    const float* __restrict__ g = reinterpret_cast<const float*>(c[3]);
    uint32_t n = (uint32_t)(c[4] & 0xffffffffu);
    float d = (c[4] >> 32) ? decay : 1.0f;
    float c1 = 1.0f - b1, c2 = 1.0f - b2;
    auto one = [&](float& wi, float& mi, float& vi, float gi) {
        float gv = gi * gs;
        mi = b1 * mi + c1 * gv;
        vi = b2 * vi + c2 * gv * gv;
        wi = d * wi - lr * (mi / bias1) / (sqrtf(vi / bias2) + eps);
    };
    // Four values a thread as 16-byte moves where all four start on 16 bytes: one value
    // at a time kept too few bytes in flight for the memory's speed.
    uint32_t head = 0;
    if (aligned16(w) && aligned16(m) && aligned16(v) && aligned16(g)) {
        head = n / 4 * 4;
        for (uint32_t i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 wv = reinterpret_cast<float4*>(w)[i], mv = reinterpret_cast<float4*>(m)[i];
            float4 vv = reinterpret_cast<float4*>(v)[i];
            float4 gv = reinterpret_cast<const float4*>(g)[i];
            one(wv.x, mv.x, vv.x, gv.x);
            one(wv.y, mv.y, vv.y, gv.y);
            one(wv.z, mv.z, vv.z, gv.z);
            one(wv.w, mv.w, vv.w, gv.w);
            reinterpret_cast<float4*>(w)[i] = wv;
            reinterpret_cast<float4*>(m)[i] = mv;
            reinterpret_cast<float4*>(v)[i] = vv;
        }
    }
    for (uint32_t i = head + threadIdx.x; i < n; i += blockDim.x) one(w[i], m[i], v[i], g[i]);
}

// x *= s in place with s one f32 in device memory: a gradient scaled by another gradient (the
// loss's incoming one) without reading it back to the host.
// 16 bytes a thread where x starts on them (the tied head's f32 gradient moved at half the
// memory's speed one value at a time).
template <typename T>
__device__ void scale_by(T* x, const float* s, size_t n) {
    float f = s[0];
    // The fused loss's gradients arrive already scaled (head_loss.rs): a factor of one,
    // known only here on the device, leaves them alone without a pass over them.
    if (f == 1.0f) return;
    size_t at = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    constexpr int V = Pack<T>::N;
    size_t head = 0;
    if (aligned16(x)) {
        head = n / V * V;
        for (size_t i = at; i < n / V; i += stride) {
            Pack<T> p = load_pack(x, i);
#pragma unroll
            for (int u = 0; u < V; u++) p.v[u] = from_f<T>(to_f(p.v[u]) * f);
            store_pack(x, i, p);
        }
    }
    for (size_t i = head + at; i < n; i += stride) x[i] = from_f<T>(to_f(x[i]) * f);
}

#define SCALE_KERNELS(NAME, T)                                                                \
    extern "C" __global__ void scale_by_##NAME(T* x, const float* s, size_t n) {              \
        scale_by<T>(x, s, n);                                                                 \
    }

FOR_DTYPES(SCALE_KERNELS)

// Sum of squares over many f32 tensors, for the gradient norm: block i takes chunk i (a
// pointer and a length, at most a few ten thousand elements of one tensor) and writes its
// sum; `sum_f32` adds the chunks' sums in one block, in a fixed order (the same bits every
// run, unlike atomics).
extern "C" __global__ void sum_squares_chunks(const uint64_t* ptrs, const uint32_t* lens,
                                              float* partial) {
    __shared__ float scratch[32];
    const float* x = reinterpret_cast<const float*>(ptrs[blockIdx.x]);
    uint32_t n = lens[blockIdx.x];
    float s = 0.0f;
    uint32_t head = 0;
    if (aligned16(x)) {  // 16-byte reads, as in adam_multi
        head = n / 4 * 4;
        for (uint32_t i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 v = reinterpret_cast<const float4*>(x)[i];
            s += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    }
    for (uint32_t i = head + threadIdx.x; i < n; i += blockDim.x) s += x[i] * x[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

extern "C" __global__ void sum_f32(const float* x, float* out, int n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = s;
}

// mHC's normed coefficient projection (fused/norm_proj.rs): z = r (x phi) with
// r = 1 / sqrt(mean_k x^2 + eps), x (N, K) in its dtype, phi (K, M) f32, M <= NP_MAXM. The
// row's sum of squares is taken beside the product, so the state is read once and never
// copied to f32. Forward: partial products and sums of squares over NP_KC-wide slices of K
// in `ksplit` parts, then `norm_proj_sum` adds them and scales: z_ext (N, M + 1), r last.
// Backward from dzz (N, 2 (M + 1)) = [dz_ext | z_ext]: dx = r (dz phi^T) - x r^2 s / K with
// s = sum_j dz_j z_j, and dphi = sum over tokens of (r dz) x.
//
// All three are products with M (24 for 4 streams) on one side, too narrow for the tensor
// cores, so they run on the CUDA cores with every thread owning a token (forward) or a column
// of K (backward) and keeping its M sums in registers: the M-wide operand is read from shared
// memory as float4 broadcasts, four multiply-adds a load. (A first version split M over
// threads and read one shared value per multiply-add: five to eight times slower.) M4 = M / 4
// rounded up is a template parameter, 6 (M <= 24) or 16 (M <= 64), so that the sums are
// registers; operands are zero past M.
#define NP_MAXM 64
#define NP_THREADS 256  // a block: a token (forward) or a column of K (backward) per thread
#define NP_KC 32        // columns of K in a forward tile
#define NP_TT 64        // tokens in a backward tile

template <typename T, int M4>
__device__ void norm_proj_part(const T* __restrict__ x, const float* __restrict__ phi,
                               float* __restrict__ part, int n, int k, int m, int ksplit) {
    __shared__ float xs[NP_THREADS][NP_KC + 1];  // padded: thread t reads row t, column cc
    __shared__ __align__(16) float ps[NP_KC][4 * M4];
    int tid = threadIdx.x;
    int t0 = blockIdx.x * NP_THREADS;
    int span = ((k + ksplit - 1) / ksplit + NP_KC - 1) / NP_KC * NP_KC;
    int kb = blockIdx.y * span, ke = min(k, kb + span);
    float acc[4 * M4];
#pragma unroll
    for (int j = 0; j < 4 * M4; j++) acc[j] = 0.0f;
    float ss = 0.0f;
    for (int c0 = kb; c0 < ke; c0 += NP_KC) {
        int kc = min(NP_KC, ke - c0);
        // Consecutive threads read consecutive 16-byte pieces of a token's row where the tile
        // is whole and aligned (always, at the model's widths), else single values.
        constexpr int V = 16 / sizeof(T);
        bool whole = kc == NP_KC && k % V == 0 && (reinterpret_cast<size_t>(x) & 15) == 0;
        if (whole) {
            for (int e = tid; e < NP_THREADS * (NP_KC / V); e += NP_THREADS) {
                int r = e / (NP_KC / V), q = e % (NP_KC / V), t = t0 + r;
                uint4 raw = make_uint4(0, 0, 0, 0);
                if (t < n) raw = *reinterpret_cast<const uint4*>(x + (size_t)t * k + c0 + q * V);
                const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
                for (int i = 0; i < V; i++) xs[r][q * V + i] = to_f(v[i]);
            }
        } else {
            for (int e = tid; e < NP_THREADS * NP_KC; e += NP_THREADS) {
                int r = e / NP_KC, cc = e % NP_KC, t = t0 + r;
                xs[r][cc] = (t < n && cc < kc) ? to_f(x[(size_t)t * k + c0 + cc]) : 0.0f;
            }
        }
        for (int e = tid; e < NP_KC * 4 * M4; e += NP_THREADS) {
            int r = e / (4 * M4), j = e % (4 * M4);
            ps[r][j] = (r < kc && j < m) ? phi[(size_t)(c0 + r) * m + j] : 0.0f;
        }
        __syncthreads();
        for (int cc = 0; cc < kc; cc++) {
            float xv = xs[tid][cc];
            ss += xv * xv;
            const float4* p4 = reinterpret_cast<const float4*>(ps[cc]);
#pragma unroll
            for (int j4 = 0; j4 < M4; j4++) {
                float4 p = p4[j4];
                acc[4 * j4] += xv * p.x;
                acc[4 * j4 + 1] += xv * p.y;
                acc[4 * j4 + 2] += xv * p.z;
                acc[4 * j4 + 3] += xv * p.w;
            }
        }
        __syncthreads();
    }
    int t = t0 + tid;
    if (t < n) {
        float* out = part + ((size_t)blockIdx.y * n + t) * (m + 1);
#pragma unroll
        for (int j = 0; j < 4 * M4; j++)
            if (j < m) out[j] = acc[j];
        out[m] = ss;
    }
}

extern "C" __global__ void norm_proj_sum(const float* part, float* z, int n, int k, int m,
                                         int ksplit, float eps) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * (m + 1)) return;
    size_t t = i / (m + 1);
    int j = i % (m + 1);
    float ss = 0.0f, v = 0.0f;
    for (int s = 0; s < ksplit; s++) {
        const float* p = part + ((size_t)s * n + t) * (m + 1);
        ss += p[m];
        if (j < m) v += p[j];
    }
    float r = 1.0f / sqrtf(ss / k + eps);
    z[i] = j < m ? v * r : r;
}

// dx, plus add where given (the state's gradient so far) and, where pre is, the pre-mix's
// part of the state's gradient (premix_bwd_s, folded in to save its own pass over the state):
// pre[t][i] dh[t][ch] at the flat index e = (t ns + i) cs + ch of x, whichever rows of K
// the projection takes (mHC's of ns cs, dynamic HC's of cs). Thread c of block (i, .) owns
// column c = NP_THREADS i + c of K and phi's row c (registers); the block walks tiles of NP_TT tokens, blockIdx.y, blockIdx.y + gridDim.y, ...
template <typename T, int M4>
__device__ void norm_proj_bwd_x(const T* __restrict__ x, const float* __restrict__ phi,
                                const float* __restrict__ dzz, const T* __restrict__ add,
                                const float* __restrict__ pre, const T* __restrict__ dh,
                                T* __restrict__ dx, int n, int k, int m, int ns, int cs) {
    __shared__ __align__(16) float dz[NP_TT][4 * M4];
    __shared__ float coef[NP_TT][2];  // r, -r^2 s / K
    int tid = threadIdx.x;
    int c = blockIdx.x * NP_THREADS + tid;
    int w = 2 * (m + 1);
    float p[4 * M4];
#pragma unroll
    for (int j = 0; j < 4 * M4; j++) p[j] = (c < k && j < m) ? phi[(size_t)c * m + j] : 0.0f;
    for (int t0 = blockIdx.y * NP_TT; t0 < n; t0 += gridDim.y * NP_TT) {
        __syncthreads();  // the previous tile is no longer read
        for (int e = tid; e < NP_TT * 4 * M4; e += NP_THREADS) {
            int r = e / (4 * M4), j = e % (4 * M4), t = t0 + r;
            dz[r][j] = (t < n && j < m) ? dzz[(size_t)t * w + j] : 0.0f;
        }
        if (tid < NP_TT) {
            int t = t0 + tid;
            float r = 0.0f, s = 0.0f;
            if (t < n) {
                const float* row = dzz + (size_t)t * w;
                r = row[2 * m + 1];
                for (int j = 0; j < m; j++) s += row[j] * row[m + 1 + j];
            }
            coef[tid][0] = r;
            coef[tid][1] = -r * r * s / k;
        }
        __syncthreads();
        if (c >= k) continue;
        int nt = min(NP_TT, n - t0);
#pragma unroll 4
        for (int i = 0; i < nt; i++) {
            const float4* d4 = reinterpret_cast<const float4*>(dz[i]);
            float acc = 0.0f;
#pragma unroll
            for (int j4 = 0; j4 < M4; j4++) {
                float4 d = d4[j4];
                acc += d.x * p[4 * j4] + d.y * p[4 * j4 + 1] + d.z * p[4 * j4 + 2] +
                       d.w * p[4 * j4 + 3];
            }
            size_t at = (size_t)(t0 + i) * k + c;
            float base = add ? to_f(add[at]) : 0.0f;
            if (pre) base += pre[at / cs] * to_f(dh[at / ((size_t)ns * cs) * cs + at % cs]);
            dx[at] = from_f<T>(base + coef[i][0] * acc + coef[i][1] * to_f(x[at]));
        }
    }
}

// Thread c of block (i, s) owns column c of K and sums x[t][c] r_t dz[t][.] over token slice
// s in registers, then adds them into the zeroed dphi once.
template <typename T, int M4>
__device__ void norm_proj_bwd_phi(const T* __restrict__ x, const float* __restrict__ dzz,
                                  float* __restrict__ dphi, int n, int k, int m, int tsplit) {
    __shared__ __align__(16) float g[NP_TT][4 * M4];  // r dz of NP_TT tokens
    int tid = threadIdx.x;
    int c = blockIdx.x * NP_THREADS + tid;
    int w = 2 * (m + 1);
    int span = (n + tsplit - 1) / tsplit;
    int tb = blockIdx.y * span, te = min(n, tb + span);
    float acc[4 * M4];
#pragma unroll
    for (int j = 0; j < 4 * M4; j++) acc[j] = 0.0f;
    for (int t0 = tb; t0 < te; t0 += NP_TT) {
        int nt = min(NP_TT, te - t0);
        __syncthreads();
        for (int e = tid; e < NP_TT * 4 * M4; e += NP_THREADS) {
            int r = e / (4 * M4), j = e % (4 * M4);
            size_t t = t0 + r;
            g[r][j] = (r < nt && j < m) ? dzz[t * w + j] * dzz[t * w + 2 * m + 1] : 0.0f;
        }
        __syncthreads();
        if (c < k) {
#pragma unroll 4
            for (int r = 0; r < nt; r++) {
                float xv = to_f(x[(size_t)(t0 + r) * k + c]);
                const float4* g4 = reinterpret_cast<const float4*>(g[r]);
#pragma unroll
                for (int j4 = 0; j4 < M4; j4++) {
                    float4 v = g4[j4];
                    acc[4 * j4] += xv * v.x;
                    acc[4 * j4 + 1] += xv * v.y;
                    acc[4 * j4 + 2] += xv * v.z;
                    acc[4 * j4 + 3] += xv * v.w;
                }
            }
        }
    }
    if (c < k) {
#pragma unroll
        for (int j = 0; j < 4 * M4; j++)
            if (j < m) atomicAdd(&dphi[(size_t)c * m + j], acc[j]);
    }
}

#define NP_KERNELS_M(NAME, T, M4, MS)                                                          \
    extern "C" __global__ void norm_proj_part_m##MS##_##NAME(                                   \
        const T* x, const float* phi, float* part, int n, int k, int m, int ksplit) {           \
        norm_proj_part<T, M4>(x, phi, part, n, k, m, ksplit);                                  \
    }                                                                                          \
    extern "C" __global__ void norm_proj_bwd_x_m##MS##_##NAME(                                  \
        const T* x, const float* phi, const float* dzz, const T* add, const float* pre,         \
        const T* dh, T* dx, int n, int k, int m, int ns, int cs) {                             \
        norm_proj_bwd_x<T, M4>(x, phi, dzz, add, pre, dh, dx, n, k, m, ns, cs);                \
    }                                                                                          \
    extern "C" __global__ void norm_proj_bwd_phi_m##MS##_##NAME(                                \
        const T* x, const float* dzz, float* dphi, int n, int k, int m, int tsplit) {           \
        norm_proj_bwd_phi<T, M4>(x, dzz, dphi, n, k, m, tsplit);                               \
    }
#define NP_KERNELS(NAME, T) NP_KERNELS_M(NAME, T, 6, 24) NP_KERNELS_M(NAME, T, 16, 64)
FOR_DTYPES(NP_KERNELS)

// The same three products on the tensor cores, for a bf16 state, M <= 32 and K a multiple of
// 64 (mHC's n C and dynamic HC's C at the model's widths). On the CUDA cores above they are
// bound by the multiply-adds (N K M of each, 1.6 G at the Goedel-1B shape); here by reading
// the state. phi is split into a bf16 pair hi + lo (2^-17 of its value) and both halves are
// multiplied, as are the pairs of dz in dx, so the sums keep f32's precision on the bf16
// products; the state is exact in bf16. dphi runs through cuBLAS (cuda.rs).
#define NPT_WARPS 8
#define NPT_KC 64                // K columns a forward step
#define NPT_PS (NPT_KC + 32)     // phi^T's shared rows: 48 words apart, 16-byte reads conflict-free

__device__ __forceinline__ void split_bf16(float v, __nv_bfloat16* hi, __nv_bfloat16* lo) {
    *hi = __float2bfloat16(v);
    *lo = __float2bfloat16(v - __bfloat162float(*hi));
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Forward partials as norm_proj_part's: a warp owns 32 tokens (two m-tiles) of the block's
// 256 and the block a K slice of `span` columns. Since a sum over K may take its terms in any
// order, lane (g, t) loads 16 contiguous bytes, columns 8t..8t+7 of each 32-column half, of
// its rows g and g + 8 and uses them as the fragment's k = 2t.., 2t+8.. of two products
// (words 2s and 2s + 1 for step s); phi^T is read in the same order from shared memory. The
// partial sums of squares come from the same registers. Both operands of the next 64
// columns are requested before the products of these (phi's into registers, then split into
// the other of two shared buffers), so that a step waits on one barrier and its loads
// overlap the previous step's work. (A first version staged phi after the barrier, a
// dependent load at a time: the kernel ran at half the bandwidth.)
extern "C" __global__ void __launch_bounds__(256, 2)
norm_proj_part_tc(const __nv_bfloat16* __restrict__ x, const float* __restrict__ phi,
                  float* __restrict__ part, int n, int k, int m, int span) {
    // [buffer][high, low][logit][column]: rows 48 words apart, 16-byte reads conflict-free.
    __shared__ __align__(16) __nv_bfloat16 ps[2][2][32][NPT_PS];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int tok0 = (blockIdx.x * NPT_WARPS + warp) * 32;
    int kb = blockIdx.y * span, ke = min(k, kb + span);
    // Thread e stages phi's row c0 + e % 64, logits 8 (e / 64).. (zero past M): a warp's
    // lanes write consecutive columns of phi^T, and its reads of a row's 8 values share
    // cache lines.
    int pr = threadIdx.x % 64, pj = 8 * (threadIdx.x / 64);
    auto fetch_phi = [&](int c0, float* v) {
#pragma unroll
        for (int i = 0; i < 8; i++)
            v[i] = pj + i < m ? phi[(size_t)(c0 + pr) * m + pj + i] : 0.0f;
    };
    // [m-tile][rows g, g + 8][half]; rows past n read the last row, unused.
    auto fetch_x = [&](int c0, uint4 (*v)[2][2]) {
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int rh = 0; rh < 2; rh++) {
                int row = min(tok0 + 16 * mt + 8 * rh + g, n - 1);
#pragma unroll
                for (int h = 0; h < 2; h++)
                    v[mt][rh][h] =
                        *reinterpret_cast<const uint4*>(x + (size_t)row * k + c0 + 32 * h + 8 * t);
            }
    };
    float acc[2][4][4], ss[2][2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        ss[i][0] = ss[i][1] = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][nt][e] = 0.0f;
    }
    float pv[8];
    uint4 xa[2][2][2];
    fetch_phi(kb, pv);
    fetch_x(kb, xa);
#pragma unroll 1
    for (int c0 = kb, buf = 0; c0 < ke; c0 += NPT_KC, buf ^= 1) {
        // The other buffer was last read two steps ago, before the previous barrier.
#pragma unroll
        for (int i = 0; i < 8; i++)
            split_bf16(pv[i], &ps[buf][0][pj + i][pr], &ps[buf][1][pj + i][pr]);
        __syncthreads();
        uint4 xn[2][2][2];
        bool more = c0 + NPT_KC < ke;
        if (more) {
            fetch_phi(c0 + NPT_KC, pv);
            fetch_x(c0 + NPT_KC, xn);
        }
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int rh = 0; rh < 2; rh++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const __nv_bfloat16* b = reinterpret_cast<const __nv_bfloat16*>(&xa[mt][rh][h]);
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        float f = __bfloat162float(b[i]);
                        ss[mt][rh] += f * f;
                    }
                }
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                uint4 bh = *reinterpret_cast<const uint4*>(&ps[buf][0][nt * 8 + g][32 * h + 8 * t]);
                uint4 bl = *reinterpret_cast<const uint4*>(&ps[buf][1][nt * 8 + g][32 * h + 8 * t]);
#pragma unroll
                for (int s = 0; s < 2; s++)
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        uint32_t a[4] = {word(xa[mt][0][h], 2 * s), word(xa[mt][1][h], 2 * s),
                                         word(xa[mt][0][h], 2 * s + 1),
                                         word(xa[mt][1][h], 2 * s + 1)};
                        mma(acc[mt][nt], a, word(bh, 2 * s), word(bh, 2 * s + 1));
                        mma(acc[mt][nt], a, word(bl, 2 * s), word(bl, 2 * s + 1));
                    }
            }
        if (more) {
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int rh = 0; rh < 2; rh++)
#pragma unroll
                    for (int h = 0; h < 2; h++) xa[mt][rh][h] = xn[mt][rh][h];
        }
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int rh = 0; rh < 2; rh++) {
            float v = ss[mt][rh];
            v += __shfl_xor_sync(0xffffffff, v, 1);
            v += __shfl_xor_sync(0xffffffff, v, 2);
            int row = tok0 + 16 * mt + 8 * rh + g;
            if (row >= n) continue;
            float* out = part + ((size_t)blockIdx.y * n + row) * (m + 1);
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int j = nt * 8 + 2 * t;
                    if (j + e < m) out[j + e] = acc[mt][nt][2 * rh + e];
                }
            if (t == 0) out[m] = v;
        }
}

// What a lane of norm_proj_bwd_x_tc reads of its rows g and g + 8 of an m-tile: x, add and
// the pre-mix's dh at its 8 columns, and pre there.
struct NptRows {
    Pack<__nv_bfloat16> x[2], a[2], h[2];
    float p[2];
};

__device__ __forceinline__ void npt_fetch(NptRows& o, const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ add,
                                          const float* __restrict__ pre,
                                          const __nv_bfloat16* __restrict__ dh, int tok0, int n,
                                          int k, int col, int ns, int cs) {
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
        int tok = min(tok0 + 8 * rh, n - 1);  // rows past the end read the last, unused
        size_t at = (size_t)tok * k + col;
        o.x[rh] = load_pack(x + at, 0);
        o.a[rh].raw = add ? load_pack(add + at, 0).raw : make_uint4(0, 0, 0, 0);
        o.h[rh].raw = make_uint4(0, 0, 0, 0);
        o.p[rh] = 0.0f;
        if (pre) {
            // The lane's 8 values lie in one stream row (C is a multiple of 8).
            o.p[rh] = pre[at / cs];
            o.h[rh] = load_pack(dh + at / ((size_t)ns * cs) * cs + at % cs, 0);
        }
    }
}

// The backward's per-token operands in mma.sync's fragment order, once for all of
// norm_proj_bwd_x_tc's column blocks (which staged them each from dzz, behind a block-wide
// barrier, for every tile of tokens: half of the kernel's time went there). For m-tile i
// (tokens 16 i..) and lane (g, t) of its warp, five uint4 at frag[(5 i + q) 32 + lane]:
// q = 0, 1 the high bf16 halves of dz as the A fragments of k steps 0 and 1 (logits 0-15,
// 16-31), q = 2, 3 the low halves, q = 4 the f32 r and -r^2 s / K of rows g and g + 8.
// Tokens past n and logits past m are zero. A warp an m-tile.
extern "C" __global__ void norm_proj_dz_frag(const float* __restrict__ dzz,
                                             uint4* __restrict__ frag, int n, int k, int m) {
    int tile = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    if (tile * 16 >= n) return;  // a whole warp
    int w = 2 * (m + 1);
    uint32_t hi[2][4], lo[2][4];
    float s[2] = {0.0f, 0.0f}, r[2] = {0.0f, 0.0f};
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
        int tok = tile * 16 + 8 * rh + g;
        bool in = tok < n;
        const float* row = dzz + (size_t)min(tok, n - 1) * w;
        if (in) r[rh] = row[2 * m + 1];
#pragma unroll
        for (int ks = 0; ks < 2; ks++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                // a0..a3 of the fragment: (g, 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, ..).
                int j = 16 * ks + 8 * half + 2 * t;
                float v[2];
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    bool on = in && j + e < m;
                    v[e] = on ? row[j + e] : 0.0f;
                    if (on) s[rh] += v[e] * row[m + 1 + j + e];
                }
                __nv_bfloat16 h0, l0, h1, l1;
                split_bf16(v[0], &h0, &l0);
                split_bf16(v[1], &h1, &l1);
                hi[ks][2 * half + rh] = pack(__bfloat162float(h0), __bfloat162float(h1));
                lo[ks][2 * half + rh] = pack(__bfloat162float(l0), __bfloat162float(l1));
            }
    }
    // The quad's four lanes hold between them every logit of rows g and g + 8.
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
        s[rh] += __shfl_xor_sync(0xffffffff, s[rh], 1);
        s[rh] += __shfl_xor_sync(0xffffffff, s[rh], 2);
    }
    uint4* out = frag + (size_t)5 * tile * 32 + lane;
    out[0] = make_uint4(hi[0][0], hi[0][1], hi[0][2], hi[0][3]);
    out[32] = make_uint4(hi[1][0], hi[1][1], hi[1][2], hi[1][3]);
    out[64] = make_uint4(lo[0][0], lo[0][1], lo[0][2], lo[0][3]);
    out[96] = make_uint4(lo[1][0], lo[1][1], lo[1][2], lo[1][3]);
    out[128] = make_uint4(__float_as_uint(r[0]), __float_as_uint(-r[0] * r[0] * s[0] / k),
                          __float_as_uint(r[1]), __float_as_uint(-r[1] * r[1] * s[1] / k));
}

// dx = r (dz phi^T) - x r^2 s / K (+ add, + pre dh as in norm_proj_bwd_x) with the M sums on
// the tensor cores: a warp owns 32 columns of K, its block 256, and walks m-tiles of 16
// tokens (blockIdx.y, + gridDim.y, ...) on its own, with no barrier: the tile's dz
// fragments and coefficients come from norm_proj_dz_frag, requested with its x, add and
// pre-mix rows before any product, so that all their latencies overlap. B's column n of tile
// nt is the state's column 4 n + nt of the warp's 32, so that lane (g, t) ends with 8
// contiguous columns, 8t..8t+7, of its rows g and g + 8: x, add and dx move as 16 bytes.
// phi's fragments are loaded once.
extern "C" __global__ void __launch_bounds__(256, 3)
norm_proj_bwd_x_tc(const __nv_bfloat16* __restrict__ x,
                                              const float* __restrict__ phi,
                                              const uint4* __restrict__ dzf,
                                              const __nv_bfloat16* __restrict__ add,
                                              const float* __restrict__ pre,
                                              const __nv_bfloat16* __restrict__ dh_in,
                                              __nv_bfloat16* __restrict__ dx, int n, int k, int m,
                                              int ns, int cs) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int base = (blockIdx.x * NPT_WARPS + warp) * 32;
    if (base >= k) return;  // K a multiple of 64, not of the block's 256
    // phi's fragments, high and low bf16 halves, [tile][k step][b0, b1] at bh(..)/bl(..):
    // in shared memory, a lane's own words 32 apart (only the lane reads them, so no barrier),
    // so that a block's registers leave room for three blocks a multiprocessor.
    __shared__ uint32_t frag[NPT_WARPS][32][32];
    auto bh = [&](int nt, int s, int q) { return frag[warp][(nt * 2 + s) * 2 + q][lane]; };
    auto bl = [&](int nt, int s, int q) { return frag[warp][16 + (nt * 2 + s) * 2 + q][lane]; };
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
        for (int s = 0; s < 2; s++)
#pragma unroll
            for (int q = 0; q < 2; q++) {
                int c = base + 4 * g + nt, j = 16 * s + 8 * q + 2 * t;
                float v0 = j < m ? phi[(size_t)c * m + j] : 0.0f;
                float v1 = j + 1 < m ? phi[(size_t)c * m + j + 1] : 0.0f;
                __nv_bfloat16 h0, l0, h1, l1;
                split_bf16(v0, &h0, &l0);
                split_bf16(v1, &h1, &l1);
                frag[warp][(nt * 2 + s) * 2 + q][lane] =
                    pack(__bfloat162float(h0), __bfloat162float(h1));
                frag[warp][16 + (nt * 2 + s) * 2 + q][lane] =
                    pack(__bfloat162float(l0), __bfloat162float(l1));
            }
    int tiles = (n + 15) / 16;
#pragma unroll 1
    for (int tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
        const uint4* f = dzf + (size_t)5 * tile * 32 + lane;
        uint4 fa[5];
#pragma unroll
        for (int q = 0; q < 5; q++) fa[q] = f[32 * q];
        NptRows cur;
        npt_fetch(cur, x, add, pre, dh_in, 16 * tile + g, n, k, base + 8 * t, ns, cs);
        const uint32_t ah[2][4] = {{fa[0].x, fa[0].y, fa[0].z, fa[0].w},
                                   {fa[1].x, fa[1].y, fa[1].z, fa[1].w}};
        const uint32_t al[2][4] = {{fa[2].x, fa[2].y, fa[2].z, fa[2].w},
                                   {fa[3].x, fa[3].y, fa[3].z, fa[3].w}};
        float acc[4][4];
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) acc[nt][e] = 0.0f;
#pragma unroll
            for (int s = 0; s < 2; s++) {
                uint32_t h0 = bh(nt, s, 0), h1 = bh(nt, s, 1);
                mma(acc[nt], ah[s], h0, h1);
                mma(acc[nt], ah[s], bl(nt, s, 0), bl(nt, s, 1));
                mma(acc[nt], al[s], h0, h1);
            }
        }
        const float coef[2][2] = {{__uint_as_float(fa[4].x), __uint_as_float(fa[4].y)},
                                  {__uint_as_float(fa[4].z), __uint_as_float(fa[4].w)}};
#pragma unroll
        for (int rh = 0; rh < 2; rh++) {
            int tok = 16 * tile + 8 * rh + g;
            if (tok >= n) continue;
            float r = coef[rh][0], c1 = coef[rh][1];
            size_t at = (size_t)tok * k + base + 8 * t;
            Pack<__nv_bfloat16> o;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float d = acc[e % 4][2 * rh + e / 4];
                o.v[e] = __float2bfloat16(__bfloat162float(cur.a[rh].v[e]) +
                                          cur.p[rh] * __bfloat162float(cur.h[rh].v[e]) +
                                          r * d + c1 * __bfloat162float(cur.x[rh].v[e]));
            }
            store_pack(dx + at, 0, o);
        }
    }
}

// g = r dz (N, M) bf16 from dzz, the right operand of dphi = x^T g on cuBLAS.
extern "C" __global__ void norm_proj_g_bf16(const float* dzz, __nv_bfloat16* g, int n, int m) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * m) return;
    size_t tok = i / m;
    int j = i % m;
    const float* row = dzz + tok * 2 * (m + 1);
    g[i] = __float2bfloat16(row[j] * row[2 * m + 1]);
}

// Muon / NorMuon's element-wise work over a stack of k matrices of `per` values each
// (fused/muon_step.rs); grids (blocks, k), blockIdx.y the matrix.
// muon_momentum: m' = beta m + gs g into out[0, k per), and out[k per + i] += the sum over
// matrix i of u^2, u = gs g + beta m' (Nesterov) or m' (the tail zeroed by the caller); gs is
// gradient clipping's factor.
extern "C" __global__ void muon_momentum(const float* m, const float* g, float* out, size_t per,
                                         float beta, int nesterov, float gs) {
    __shared__ float scratch[32];
    size_t base = (size_t)blockIdx.y * per;
    float ss = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < per;
         i += (size_t)gridDim.x * blockDim.x) {
        float gv = g[base + i] * gs, mv = beta * m[base + i] + gv;
        out[base + i] = mv;
        float u = nesterov ? gv + beta * mv : mv;
        ss += u * u;
    }
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) atomicAdd(&out[(size_t)gridDim.y * per + blockIdx.y], ss);
}

// x = u / (|u|_F + 1e-7) per matrix in T: Newton-Schulz's input, u recomputed from m' and g.
template <typename T>
__device__ void muon_scale(const float* m, const float* g, const float* ss, T* x, size_t per,
                           float beta, int nesterov, float gs) {
    size_t base = (size_t)blockIdx.y * per;
    float inv = 1.0f / (sqrtf(ss[blockIdx.y]) + 1e-7f);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < per;
         i += (size_t)gridDim.x * blockDim.x) {
        float mv = m[base + i];
        float u = nesterov ? g[base + i] * gs + beta * mv : mv;
        x[base + i] = from_f<T>(u * inv);
    }
}

// rs[r] = sum of o[r][.]^2, a warp a row.
template <typename T>
__device__ void row_sumsq(const T* o, float* rs, size_t rows, int cols) {
    size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const T* r = o + row * cols;
    float ss = 0.0f;
    for (int j = threadIdx.x % 32; j < cols; j += 32) {
        float v = to_f(r[j]);
        ss += v * v;
    }
    for (int s = 16; s > 0; s /= 2) ss += __shfl_xor_sync(0xffffffff, ss, s);
    if (threadIdx.x % 32 == 0) rs[row] = ss;
}

// The weight's update in place: w = decay w - f[row] o.
template <typename T>
__device__ void muon_apply(float* w, const T* o, const float* f, size_t n, int cols,
                           float decay) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        w[i] = decay * w[i] - f[i / cols] * to_f(o[i]);
}

#define MUON_KERNELS(NAME, T)                                                                 \
    extern "C" __global__ void muon_scale_##NAME(const float* m, const float* g,               \
                                                 const float* ss, T* x, size_t per,            \
                                                 float beta, int nesterov, float gs) {        \
        muon_scale<T>(m, g, ss, x, per, beta, nesterov, gs);                                  \
    }                                                                                         \
    extern "C" __global__ void row_sumsq_##NAME(const T* o, float* rs, size_t rows, int cols) { \
        row_sumsq<T>(o, rs, rows, cols);                                                      \
    }                                                                                         \
    extern "C" __global__ void muon_apply_##NAME(float* w, const T* o, const float* f,         \
                                                 size_t n, int cols, float decay) {            \
        muon_apply<T>(w, o, f, n, cols, decay);                                               \
    }

FOR_DTYPES(MUON_KERNELS)

// Newton-Schulz's polynomial's start (fused/newton_schulz.rs): p = b g + a I over a stack of
// s x s Gram matrices, bf16; the round's GEMMs then add c g g into it and apply it.
extern "C" __global__ void ns_poly_init(const __nv_bfloat16* g, __nv_bfloat16* p, size_t n,
                                        int s, float a, float b) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t e = i % ((size_t)s * s);
        float v = b * __bfloat162float(g[i]) + (e / s == e % s ? a : 0.0f);
        p[i] = __float2bfloat16(v);
    }
}
