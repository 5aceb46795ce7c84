// The tensor-core primitives the kernels share (flash.cu, and fused.cu's normed projection):
// one warp-wide bf16 product on mma.sync m16n8k16 with f32 sums, and two f32 values packed as
// a bf16 pair. Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 g + t:
// A (16 x 16) a0: (g, 2t..2t+1), a1: (g+8, 2t..), a2: (g, 2t+8..), a3: (g+8, 2t+8..);
// B (16 x 8) b0: (k 2t..2t+1, n g), b1: (k 2t+8.., n g); C (16 x 8) c0, c1: (g, 2t..2t+1),
// c2, c3: (g+8, 2t..2t+1).
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

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
