// What flash.cu (mma.sync, sm_80 on) and flash_sm90.cu (wgmma, Hopper) share: cp.async
// staging of f32 rows, the accumulators' fragment layout and its stores, and the softmax
// backward's row dots. Both kernels' accumulators are laid out as mma.sync's C fragments:
// wgmma's m64 tiles are four warps' m16 tiles, each warp's in mma.sync's layout.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "mma.cuh"

typedef __nv_bfloat16 bf16;

// Copies n floats (from base + r0) into shared memory with cp.async, 4 bytes a thread of THREADS;
// those at or past `valid` are zeros. Part of the thread's next committed group.
template <int NTH>
__device__ __forceinline__ void stage_floats_async(float* dst, const float* base, int r0, int n,
                                                   int valid) {
    for (int i = threadIdx.x; i < n; i += NTH) {
        bool in = r0 + i < valid;
        const float* src = in ? base + r0 + i : base;
        uint32_t d = (uint32_t)__cvta_generic_to_shared(dst + i);
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src),
                     "r"(in ? 4 : 0));
    }
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The C tiles of a 16 x (8 NT) product as A fragments of the next product (bf16).
template <int NT>
__device__ __forceinline__ void to_a(uint32_t (*a)[4], const float (*c)[4]) {
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        a[kk][0] = pack(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

template <int N>
__device__ __forceinline__ void zero(float (*c)[4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.0f;
}

// Row/column of C element e of n-tile nt, relative to the tile's origin.
#define C_ROW(e) (g + ((e) >> 1) * 8)
#define C_COL(nt, e) ((nt) * 8 + 2 * t + ((e) & 1))

// Writes 16 rows (from r0, rows at or past `valid` skipped) of a 16 x HD accumulator, times
// `scale`, to dst rows `stride` apart.
template <int HD>
__device__ __forceinline__ void store_rows(bf16* dst, size_t stride, int r0, int valid,
                                           const float (*acc)[4], float scale) {
    int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int row = r0 + g + r * 8;
        if (row >= valid) continue;
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            *reinterpret_cast<__nv_bfloat162*>(dst + (size_t)row * stride + nt * 8 + 2 * t) =
                __floats2bfloat162_rn(acc[nt][2 * r] * scale, acc[nt][2 * r + 1] * scale);
        }
    }
}

// D = rowsum(dO * O) of the rows r0.. (16, those at or past T skipped) of a warp, the softmax
// backward's correction: written to `d` (B, H, T) for the dK/dV kernel, and rows g and g + 8
// returned in dr as the fragment layout holds them.
template <int HD>
__device__ __forceinline__ void row_dots(const bf16* o, const bf16* dout, size_t stride, int r0,
                                         int T, float* d, float* dr) {
    int lane = threadIdx.x % 32, g = lane >> 2;
    // Unrolled, so that all 16 rows' loads are in flight at once.
#pragma unroll
    for (int r = 0; r < 16; ++r) {
        int row = r0 + r;
        float s = 0.0f;
        if (row < T) {
            const __nv_bfloat162* x =
                reinterpret_cast<const __nv_bfloat162*>(o + (size_t)row * stride);
            const __nv_bfloat162* y =
                reinterpret_cast<const __nv_bfloat162*>(dout + (size_t)row * stride);
            for (int i = lane; i < HD / 2; i += 32) {
                float2 a = __bfloat1622float2(x[i]), c = __bfloat1622float2(y[i]);
                s += a.x * c.x + a.y * c.y;
            }
        }
        for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffff, s, off);
        if (lane == 0 && row < T) d[row] = s;
        if (g == (r & 7)) dr[r >> 3] = s;
    }
}
