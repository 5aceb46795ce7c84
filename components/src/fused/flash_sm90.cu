// Causal flash attention on Hopper's warpgroup products (wgmma, sm_90a): the same three
// passes, the same inputs and outputs and the same arithmetic as flash.cu (which runs on
// mma.sync from sm_80 on and stays the path for other GPUs), with the tiles' products issued
// a warpgroup (four warps, 128 threads) at a time: one instruction multiplies 64 rows by up
// to 128 columns and 16 of K, reading its B operand, and its A operand where not from
// registers, straight from shared memory. No fragment is loaded by ldmatrix and no operand
// is read twice by the warps of a group, which is what bound flash.cu's kernels (ncu: the
// tensor pipe 22-28% busy, the warps waiting on shared memory and on each other).
//
// Tiles in shared memory (all of Q, K, V and dO: rows of HD bf16) are laid out for wgmma's
// 128-byte swizzle: rows of 64 values (128 bytes), row r's 16-byte chunk c stored at chunk
// c ^ (r % 8), and a head of 128 as two such column blocks of the tile's R rows, R x 128
// bytes apart. One image serves as a K-major operand (Q K^T: the rows are M or N, HD is K)
// and as an MN-major one (P V: the rows are K, HD is N): no tile is copied transposed.
// benches/gpu/wgmma_probe.cu pinned the descriptors down on an H200: K-major, the start
// stepped 32 bytes per 16 of K inside a column block and a block on past 64, stride 1024
// bytes between 8-row groups; MN-major, 2048 bytes per 16 rows of K, 1024 between 8-row
// groups, R x 128 between the column blocks. A from registers takes mma.sync's A fragment
// layout, and the accumulators are mma.sync's C fragments warp by warp (flash.cuh), so a
// score tile becomes the next product's A operand in registers, as in flash.cu.
//
// Compiled to PTX for compute_90a by components/build.rs under the `cuda` feature; cuda.rs
// loads it only on a GPU of compute capability 9.0.

#include <type_traits>

#include "flash.cuh"

#define WG 128  // threads of a warpgroup: four warps, the 64 rows of a wgmma tile
#define QS 64   // queries a step of the dK/dV kernel, keys a step of the others

extern __shared__ __align__(128) unsigned char smem90[];

// The first 1024-byte boundary of the dynamic shared memory, as a shared address (the host
// asks for 1 KB more than the tiles take): the swizzle is a function of address bits 4-9.
__device__ __forceinline__ uint32_t smem_base() {
    return ((uint32_t)__cvta_generic_to_shared(smem90) + 1023) & ~1023u;
}

// The length rounded up to whole blocks of 64: dS^T's squares are that wide, so that every
// tile the two kernels move lies inside its head's square.
__device__ __forceinline__ int padded(int T) { return (T + 63) / 64 * 64; }

// A generic pointer to shared address `a`, for what the threads read themselves.
template <typename T>
__device__ __forceinline__ T* generic(uint32_t a) {
    return reinterpret_cast<T*>(smem90 + (a - (uint32_t)__cvta_generic_to_shared(smem90)));
}

// Copies R rows x HD (row r at base + (r0 + r) stride; rows at or past `valid` zeros) into
// the swizzled tile of R rows at shared address `dst`, with cp.async, NTH threads.
template <int HD, int NTH>
__device__ __forceinline__ void stage_sw(uint32_t dst, int R, const bf16* base, size_t stride,
                                         int r0, int valid) {
    for (int i = threadIdx.x; i < R * HD / 8; i += NTH) {
        int r = i / (HD / 8), c = i % (HD / 8);
        bool in = r0 + r < valid;
        const bf16* src = in ? base + (size_t)(r0 + r) * stride + c * 8 : base;
        uint32_t d = dst + (c >> 3) * R * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                     "r"(in ? 16 : 0));
    }
}

// All but this thread's newest N groups of copies have landed and, past the barrier, every
// thread's are visible to wgmma: cp.async writes through the generic proxy, wgmma reads
// through the async proxy, and the fence orders the two.
template <int N>
__device__ __forceinline__ void tiles_ready() {
    cp_wait<N>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
}

// A shared-memory matrix descriptor with the 128-byte swizzle: start address, leading and
// stride byte offsets, each in 16-byte units.
__device__ __forceinline__ uint64_t desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr >> 4) & 0x3FFF) | (uint64_t)((lbo >> 4) & 0x3FFF) << 16 |
           (uint64_t)((sbo >> 4) & 0x3FFF) << 32 | 1ull << 62;
}

// K-major: the 64 (A) or N (B) rows from `rows` (shared address of a row of a tile of R
// rows; HD along K), K step s (16 values).
__device__ __forceinline__ uint64_t desc_k(uint32_t rows, int R, int s) {
    return desc(rows + (s >> 2) * R * 128 + (s & 3) * 32, 16, 1024);
}

// MN-major B: a tile of R rows read as K (the rows) x N (HD), K step s = rows 16 s...
__device__ __forceinline__ uint64_t desc_mn(uint32_t tile, int R, int s) {
    return desc(tile + s * 2048, R * 128, 1024);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// After wg_wait: the accumulators are read only from here on. wgmma writes them
// asynchronously, which the compiler cannot see; this empty statement, ordered after the
// wait, "writes" each of them, so no read is moved above the wait.
template <int N>
__device__ __forceinline__ void hold(float* d) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define F8(i)                                                                                 \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
        "+f"(d[i + 6]), "+f"(d[i + 7])
#define R32                                                                                    \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
    "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define R64                                                                                    \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
    "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "   \
    "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "   \
    "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d (64 x 64) = A B^T (+ d if acc): A's 64 rows and B's 64 rows both K-major in shared
// memory (S = Q K^T, dP = dO V^T and their transposes).
__device__ __forceinline__ void mma_ss64(float* d, uint64_t a, uint64_t b, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " R32
                 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : F8(0), F8(8), F8(16), F8(24)
                 : "l"(a), "l"(b), "r"(acc));
}

// d (64 x HD) += A B: A (64 x 16) from registers in mma.sync's A fragment layout, B the
// MN-major tile (P V, dS K, P^T dO, dS^T Q).
template <int HD>
__device__ __forceinline__ void mma_rs(float* d, const uint32_t* a, uint64_t b);

template <>
__device__ __forceinline__ void mma_rs<64>(float* d, const uint32_t* a, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " R32
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : F8(0), F8(8), F8(16), F8(24)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

template <>
__device__ __forceinline__ void mma_rs<128>(float* d, const uint32_t* a, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " R64
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : F8(0), F8(8), F8(16), F8(24), F8(32), F8(40), F8(48), F8(56)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// d (64 x HD) += A B over 64 of K: A a 64 x 64 accumulator tile (bf16-rounded on the way),
// B the MN-major tile of 64 rows at `tile`.
template <int HD>
__device__ __forceinline__ void mma_rs_tile(float* d, const float* a, uint32_t tile) {
    uint32_t f[QS / 16][4];
    to_a<QS / 8>(f, reinterpret_cast<const float(*)[4]>(a));
#pragma unroll
    for (int s = 0; s < QS / 16; ++s) mma_rs<HD>(d, f[s], desc_mn(tile, QS, s));
}

// Where a thread stands in its warpgroup: the lane's g and t, and its warp's first row of
// the group's 64.
struct Lane {
    int wg, g, t, w0;
};

__device__ __forceinline__ Lane lane_of() {
    int lane = threadIdx.x % 32;
    return {(int)threadIdx.x / WG, lane >> 2, lane & 3, (int)(threadIdx.x % WG) / 32 * 16};
}

// The forward pass's end for a warp's 16 rows from row0 of head (b, h): the sums completed
// across the quad, the log-sum-exp written, the output normalized and stored as rows.
template <int HD>
__device__ __forceinline__ void finish_rows(float* acc, const float* m, float* l, bf16* o,
                                            float* lse, int b, int h, int H, int T, int row0) {
    int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    size_t ostride = (size_t)H * HD;
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
        inv[r] = 1.0f / l[r];
        int row = row0 + g + r * 8;
        if (t == 0 && row < T) lse[(size_t)(b * H + h) * T + row] = m[r] + log2f(l[r]);
    }
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) acc[i] *= inv[(i & 3) >> 1];
    store_rows<HD>(o + (size_t)b * T * ostride + (size_t)h * HD, ostride, row0, T,
                   reinterpret_cast<const float(*)[4]>(acc), 1.0f);
}

// One key block's online softmax for a warp's rows g and g + 8: the scores s (64 x 64 of
// the group, raw) become probabilities, masked past the diagonal where the block reaches
// it; m and l (running max and this thread's share of the sum) move on, and alpha is what
// the output's rows are scaled by.
__device__ __forceinline__ void softmax_step(float* s, float* m, float* l, float* alpha,
                                             int key0, int row0, float scale_log2) {
    int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    bool diagonal = key0 + QS - 1 > row0;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < QS / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float x = s[4 * j + e] * scale_log2;
            if (diagonal && key0 + C_COL(j, e) > row0 + C_ROW(e)) x = -INFINITY;
            s[4 * j + e] = x;
            mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
        // Every row sees key 0, in block 0: from there on its max is finite.
        float mn = fmaxf(m[r], mx[r]);
        alpha[r] = exp2f(m[r] - mn);
        m[r] = mn;
        l[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < QS / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float p = exp2f(s[4 * j + e] - m[e >> 1]);
            s[4 * j + e] = p;
            l[e >> 1] += p;
        }
    }
}

// Grid (B H, query blocks of 64 WGS, longest first); shared: Q of the block, then two
// buffers of K and V of QS keys. A warpgroup holds 64 queries; the groups of a block share
// the key tiles. Writes O (rows) and the log-sum-exp, as flash.cu's forward kernel.
template <int HD, int WGS>
__device__ __forceinline__ void fwd90(const bf16* q, const bf16* k, const bf16* v, bf16* o,
                                      float* lse, int H, int KV, int T, float scale_log2) {
    constexpr int QB = 64 * WGS, NTH = WG * WGS;
    constexpr uint32_t KT = QS * HD * 2;
    const uint32_t qs = smem_base();
    auto kbuf = [&](int i) { return qs + QB * HD * 2 + i * 2 * KT; };  // K, V KT after it
    int qb = gridDim.y - 1 - blockIdx.y;
    int b = blockIdx.x / H, h = blockIdx.x % H, kvh = h / (H / KV);
    auto [wg, g, t, w0] = lane_of();
    int q0 = qb * QB + wg * 64;  // the group's first query
    const bf16* kp = k + (size_t)(b * KV + kvh) * T * HD;
    const bf16* vp = v + ((size_t)b * T * KV + kvh) * HD;
    size_t kvstride = (size_t)KV * HD;
    stage_sw<HD, NTH>(qs, QB, q + (size_t)(b * H + h) * T * HD, HD, qb * QB, T);
    stage_sw<HD, NTH>(kbuf(0), QS, kp, HD, 0, T);
    stage_sw<HD, NTH>(kbuf(0) + KT, QS, vp, kvstride, 0, T);
    cp_commit();
    float acc[HD / 2], s[QS / 2];
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) acc[i] = 0.0f;
    // Rows g and g + 8 of the warp: running max and this thread's share of the sum.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    int last = min((qb * QB + QB - 1) / QS, (T - 1) / QS);

    for (int kb = 0; kb <= last; ++kb) {
        if (kb < last) {
            stage_sw<HD, NTH>(kbuf((kb + 1) & 1), QS, kp, HD, (kb + 1) * QS, T);
            stage_sw<HD, NTH>(kbuf((kb + 1) & 1) + KT, QS, vp, kvstride, (kb + 1) * QS, T);
        }
        cp_commit();
        tiles_ready<1>();
        uint32_t ks = kbuf(kb & 1), vs = ks + KT;
        // A group whose queries all come before the block has nothing to add.
        if (kb * QS <= q0 + 63) {
            wg_fence();
#pragma unroll
            for (int st = 0; st < HD / 16; ++st)
                mma_ss64(s, desc_k(qs + wg * 64 * 128, QB, st), desc_k(ks, QS, st), st);
            wg_commit();
            wg_wait<0>();
            hold<QS / 2>(s);
            float alpha[2];
            softmax_step(s, m, l, alpha, kb * QS, q0 + w0, scale_log2);
#pragma unroll
            for (int j = 0; j < HD / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[4 * j + e] *= alpha[e >> 1];
            }
            wg_fence();
            mma_rs_tile<HD>(acc, s, vs);  // O += P V
            wg_commit();
            wg_wait<0>();
            hold<HD / 2>(acc);
        }
        __syncthreads();  // every group is done with the buffer the next load overwrites
    }
    finish_rows<HD>(acc, m, l, o, lse, b, h, H, T, q0 + w0);
}

// The forward pass with the next block's scores in flight under this block's softmax, as
// FlashAttention-3 overlaps them within a warpgroup: WGS warpgroups of 64 queries a block,
// sharing the key and value tiles (shared: Q of the block, two slots of K and two of V,
// each refilled as soon as the products reading it have finished). Per key block kb: the
// scores S(kb + 1) = Q K(kb + 1)^T are issued, the softmax of S(kb) runs while they and
// P(kb - 1) V(kb - 1) run, then P(kb) V(kb) is issued.
//
// Why several groups: a product of 64 x 64 scores reads its 64 x 16 operands from shared
// memory at the rate the tensor cores consume them, so the tiles' own copies into shared
// memory are what a step can shed; groups that share them copy half as much a query. The
// groups move through the key blocks together (the barriers between the copies span the
// block); the first group, whose queries end before the block's last key block, passes
// that block's barriers without its products.
template <int HD, int WGS>
__device__ __forceinline__ void fwd90p(const bf16* q, const bf16* k, const bf16* v, bf16* o,
                                       float* lse, int H, int KV, int T, float scale_log2) {
    constexpr int QB = 64 * WGS, NTH = WG * WGS;
    constexpr uint32_t KT = QS * HD * 2;
    const uint32_t qs = smem_base();
    auto kslot = [&](int i) { return qs + WGS * KT + (i & 1) * KT; };
    auto vslot = [&](int i) { return qs + (WGS + 2) * KT + (i & 1) * KT; };
    int qb = gridDim.y - 1 - blockIdx.y;
    int b = blockIdx.x / H, h = blockIdx.x % H, kvh = h / (H / KV);
    Lane ln = lane_of();  // named, not bound: the lambda below captures them
    int w0 = ln.w0;
    int q0 = qb * QB + ln.wg * 64;       // the group's first query
    const uint32_t qg = qs + ln.wg * 64 * 128;  // its rows of the Q tile
    const bf16* kp = k + (size_t)(b * KV + kvh) * T * HD;
    const bf16* vp = v + ((size_t)b * T * KV + kvh) * HD;
    size_t kvstride = (size_t)KV * HD;
    int last = min((qb * QB + QB - 1) / QS, (T - 1) / QS);
    // cp.async groups, in order: {Q, K0, V0}, {K1}, {} (V0's place), then per block kb
    // {K(kb + 2)} and {V(kb + 1)}, each possibly empty, so that the waits' counts are fixed.
    stage_sw<HD, NTH>(qs, QB, q + (size_t)(b * H + h) * T * HD, HD, qb * QB, T);
    stage_sw<HD, NTH>(kslot(0), QS, kp, HD, 0, T);
    stage_sw<HD, NTH>(vslot(0), QS, vp, kvstride, 0, T);
    cp_commit();
    if (last >= 1) stage_sw<HD, NTH>(kslot(1), QS, kp, HD, QS, T);
    cp_commit();
    cp_commit();
    float acc[HD / 2], s[QS / 2], sn[QS / 2];
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) acc[i] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    tiles_ready<2>();
    wg_fence();
#pragma unroll
    for (int st = 0; st < HD / 16; ++st) mma_ss64(s, desc_k(qg, QB, st), desc_k(kslot(0), QS, st), st);
    wg_commit();
    wg_wait<0>();
    hold<QS / 2>(s);

    // One key block; with NEXT (every block but the last), S(kb + 1) is issued under its
    // softmax. Two copies, so that ptxas sees a fixed number of products in flight at every
    // wait (a wait under a runtime condition makes it serialize them).
    // The scores alternate between s and sn (no copy, which would let the compiler give
    // both the same registers, under a product in flight).
    auto block = [&](int kb, auto next, float* s, float* sn) {
        constexpr bool NEXT = decltype(next)::value;
        tiles_ready<1>();  // K(kb + 1) has landed; every warp is done with S(kb)'s K slot
        if (kb + 2 <= last) stage_sw<HD, NTH>(kslot(kb), QS, kp, HD, (kb + 2) * QS, T);
        cp_commit();
        if constexpr (NEXT) {
            wg_fence();
#pragma unroll
            for (int st = 0; st < HD / 16; ++st)
                mma_ss64(sn, desc_k(qg, QB, st), desc_k(kslot(kb + 1), QS, st), st);
            wg_commit();
        }
        float alpha[2];
        softmax_step(s, m, l, alpha, kb * QS, q0 + w0, scale_log2);
        // P(kb - 1) V(kb - 1) has finished (S(kb + 1) may still run): the output is ours.
        wg_wait<NEXT ? 1 : 0>();
        hold<HD / 2>(acc);
#pragma unroll
        for (int i = 0; i < HD / 2; ++i) acc[i] *= alpha[(i & 3) >> 1];
        tiles_ready<1>();  // V(kb) has landed; every warp is done with V(kb - 1)'s slot
        if (kb + 1 <= last) stage_sw<HD, NTH>(vslot(kb + 1), QS, vp, kvstride, (kb + 1) * QS, T);
        cp_commit();
        wg_fence();
        mma_rs_tile<HD>(acc, s, vslot(kb));  // O += P V
        wg_commit();
        if constexpr (NEXT) {
            wg_wait<1>();  // S(kb + 1); P(kb) V(kb) may still run
            hold<QS / 2>(sn);
        }
    };
    // The group's own last key block: with two groups, the first one's queries end a block
    // before the block's last key block.
    int mine = min(last, (q0 + 63) / QS);
    int kb = 0;
    for (; kb + 1 < mine; kb += 2) {
        block(kb, std::true_type{}, s, sn);
        block(kb + 1, std::true_type{}, sn, s);
    }
    if (kb < mine) {
        block(kb, std::true_type{}, s, sn);
        block(mine, std::false_type{}, sn, s);
    } else {
        block(mine, std::false_type{}, s, sn);
    }
    if (mine < last) {
        // The other group's last block: this one only keeps the barriers and the copies'
        // counts in step with it (there is nothing left to copy).
        tiles_ready<1>();
        cp_commit();
        tiles_ready<1>();
        cp_commit();
    }
    wg_wait<0>();
    hold<HD / 2>(acc);
    finish_rows<HD>(acc, m, l, o, lse, b, h, H, T, q0 + w0);
}

// Bytes between the rows of a warp's staging of dS^T: 64 bf16 and 16 bytes, so that the
// eight rows a fragment store writes fall in different banks.
#define DS_ROW 144

// Writes a warp's 16 x 64 tile of A fragments (rows g, g + 8; mma.sync's A layout) to rows
// of `out`, `stride` elements apart, through the warp's staging rows `stage`: the fragments'
// 4-byte pieces go to shared memory, whole 128-byte rows from there to memory.
__device__ __forceinline__ void write_rows(unsigned char* stage, const uint32_t (*f)[4],
                                           bf16* out, size_t stride) {
    int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < QS / 16; ++i) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            // Register r: row g (+ 8 for r odd), columns 16 i + 2 t (+ 8 for r >= 2), and the next.
            int row = g + (r & 1) * 8, col = 16 * i + 2 * t + (r >> 1) * 8;
            *reinterpret_cast<uint32_t*>(stage + row * DS_ROW + col * 2) = f[i][r];
        }
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int row = i * 4 + lane / 8, c = lane % 8;  // 16 rows of eight 16-byte chunks
        *reinterpret_cast<uint4*>(out + (size_t)row * stride + c * 8) =
            *reinterpret_cast<const uint4*>(stage + row * DS_ROW + c * 16);
    }
    __syncwarp();  // read before the next step's fragments overwrite it
}

// Grid (B KV, key blocks of 64 WGS); shared: K and V of the block, then two buffers of Q and
// dO of a step of QS queries with their log-sum-exp and D, and the warps' staging of dS^T
// (write_rows). A warpgroup owns 64 keys and
// computes the transposed products (keys x queries), so that P^T and dS^T are A operands in
// registers and dK, dV stay in its registers; the groups of a block share the query tiles.
// dK and dV are summed over the query heads that share the key/value head, as flash.cu's.
// It also writes dS^T (bf16, B H squares of the padded length) for the dQ kernel, which then
// is a plain product, dQ = dS K: S and dP are computed once, not twice as in flash.cu.
template <int HD, int WGS>
__device__ __forceinline__ void kv90(const bf16* q, const bf16* k, const bf16* v,
                                     const bf16* dout, const float* lse, const float* dsum,
                                     bf16* dk, bf16* dv, bf16* dst, int H, int KV, int T,
                                     float scale_log2, float scale) {
    constexpr int KB = 64 * WGS, NTH = WG * WGS;
    constexpr uint32_t KT = KB * HD * 2, QT = QS * HD * 2;
    const uint32_t ks = smem_base(), vs = ks + KT;
    auto qbuf = [&](int i) { return vs + KT + i * 2 * QT; };  // Q, dO QT after it
    auto lbuf = [&](int i) { return qbuf(2) + i * 2 * QS * 4; };  // log-sum-exp, D after it
    int kb = blockIdx.y;  // the first key blocks see the most queries: they start first
    int b = blockIdx.x / KV, kvh = blockIdx.x % KV, rep = H / KV;
    auto [wg, g, t, w0] = lane_of();
    int k0 = kb * KB + wg * 64;  // the group's first key
    size_t kvstride = (size_t)KV * HD, ostride = (size_t)H * HD;
    float dka[HD / 2], dva[HD / 2], st[QS / 2], dpt[QS / 2];
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) dka[i] = dva[i] = 0.0f;
    // The steps: every query head of this key/value head, its queries from this key block's
    // own (the first that see it) to the end.
    int first = kb * KB / QS, per_head = (T + QS - 1) / QS - first;
    int items = rep * per_head, tp = padded(T);
    auto issue = [&](int item, int buf) {
        int h = kvh * rep + item / per_head, s0 = (first + item % per_head) * QS;
        stage_sw<HD, NTH>(qbuf(buf), QS, q + (size_t)(b * H + h) * T * HD, HD, s0, T);
        stage_sw<HD, NTH>(qbuf(buf) + QT, QS, dout + (size_t)b * T * ostride + (size_t)h * HD,
                          ostride, s0, T);
        stage_floats_async<NTH>(generic<float>(lbuf(buf)), lse + (size_t)(b * H + h) * T, s0,
                                QS, T);
        stage_floats_async<NTH>(generic<float>(lbuf(buf)) + QS, dsum + (size_t)(b * H + h) * T,
                                s0, QS, T);
    };
    stage_sw<HD, NTH>(ks, KB, k + (size_t)(b * KV + kvh) * T * HD, HD, kb * KB, T);
    stage_sw<HD, NTH>(vs, KB, v + ((size_t)b * T * KV + kvh) * HD, kvstride, kb * KB, T);
    issue(0, 0);
    cp_commit();

    for (int item = 0; item < items; ++item) {
        int buf = item & 1, s0 = (first + item % per_head) * QS;
        if (item + 1 < items) issue(item + 1, buf ^ 1);
        cp_commit();
        tiles_ready<1>();
        uint32_t qs = qbuf(buf), ds = qs + QT;
        const float* ls = generic<const float>(lbuf(buf));
        const float* dd = ls + QS;
        // A group whose keys all come after the step's queries has nothing to add (with one
        // group a block, every step sees some of its keys).
        if (WGS == 1 || s0 + QS - 1 >= k0) {
            // S^T (64 keys x QS queries) = K Q^T, dP^T = V dO^T.
            wg_fence();
#pragma unroll
            for (int s = 0; s < HD / 16; ++s)
                mma_ss64(st, desc_k(ks + wg * 64 * 128, KB, s), desc_k(qs, QS, s), s);
#pragma unroll
            for (int s = 0; s < HD / 16; ++s)
                mma_ss64(dpt, desc_k(vs + wg * 64 * 128, KB, s), desc_k(ds, QS, s), s);
            wg_commit();
            wg_wait<0>();
            hold<QS / 2>(st);
            hold<QS / 2>(dpt);
#pragma unroll
            for (int j = 0; j < QS / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int qi = C_COL(j, e);
                    // Keys past T too: their dS^T must be zero for the dQ kernel.
                    int key = k0 + w0 + C_ROW(e);
                    bool seen = key <= s0 + qi && s0 + qi < T && key < T;
                    float p = seen ? exp2f(st[4 * j + e] * scale_log2 - ls[qi]) : 0.0f;
                    st[4 * j + e] = p;                                 // P^T
                    dpt[4 * j + e] = p * (dpt[4 * j + e] - dd[qi]);    // dS^T
                }
            }
            uint32_t pa[QS / 16][4], sa[QS / 16][4];
            to_a<QS / 8>(pa, reinterpret_cast<const float(*)[4]>(st));
            to_a<QS / 8>(sa, reinterpret_cast<const float(*)[4]>(dpt));
            wg_fence();
#pragma unroll
            for (int i = 0; i < QS / 16; ++i) mma_rs<HD>(dva, pa[i], desc_mn(ds, QS, i));  // dV += P^T dO
#pragma unroll
            for (int i = 0; i < QS / 16; ++i) mma_rs<HD>(dka, sa[i], desc_mn(qs, QS, i));  // dK += dS^T Q
            wg_commit();
            // dS^T for the dQ kernel, while the products run: row key, column query of the
            // head's padded square (zeros outside the causal triangle and past T), through
            // the warp's own rows of shared memory so that the stores are whole lines.
            int h = kvh * rep + item / per_head;
            bf16* out = dst + ((size_t)(b * H + h) * tp + k0 + w0) * tp + s0;
            write_rows(generic<unsigned char>(lbuf(2)) + (threadIdx.x / 32) * 16 * DS_ROW, sa,
                       out, tp);
            wg_wait<0>();
            hold<HD / 2>(dva);
            hold<HD / 2>(dka);
        }
        __syncthreads();  // every group is done with the buffer the next load overwrites
    }
    store_rows<HD>(dk + (size_t)(b * KV + kvh) * T * HD, HD, k0 + w0, T,
                   reinterpret_cast<const float(*)[4]>(dka), scale);
    store_rows<HD>(dv + ((size_t)b * T * KV + kvh) * HD, kvstride, k0 + w0, T,
                   reinterpret_cast<const float(*)[4]>(dva), 1.0f);
}

// Grid (B H, blocks of 64 rows); four warps of 16 rows: D = rowsum(dO * O), the softmax
// backward's correction, for the dK/dV kernel.
template <int HD>
__device__ __forceinline__ void dsum90(const bf16* o, const bf16* dout, float* dsum, int H,
                                       int T) {
    int b = blockIdx.x / H, h = blockIdx.x % H;
    size_t stride = (size_t)H * HD, off = (size_t)b * T * stride + (size_t)h * HD;
    float dr[2];
    row_dots<HD>(o + off, dout + off, stride, blockIdx.y * 64 + (int)threadIdx.x / 32 * 16, T,
                 dsum + (size_t)(b * H + h) * T, dr);
}

// d (64 x HD) += A B: A (64 x 16) read transposed from shared memory (a tile whose rows are
// K: dS^T's keys), B the MN-major tile (K's rows).
template <int HD>
__device__ __forceinline__ void mma_tt(float* d, uint64_t a, uint64_t b);

template <>
__device__ __forceinline__ void mma_tt<64>(float* d, uint64_t a, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " R32
                 ", %32, %33, p, 1, 1, 1, 1;\n}\n"
                 : F8(0), F8(8), F8(16), F8(24)
                 : "l"(a), "l"(b), "r"(1));
}

template <>
__device__ __forceinline__ void mma_tt<128>(float* d, uint64_t a, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " R64
                 ", %64, %65, p, 1, 1, 1, 1;\n}\n"
                 : F8(0), F8(8), F8(16), F8(24), F8(32), F8(40), F8(48), F8(56)
                 : "l"(a), "l"(b), "r"(1));
}

// Grid (B H, query blocks of 64, longest first), one warpgroup; shared: two buffers of a
// 64 x 64 tile of dS^T (keys x the block's queries) and K of its 64 keys. dQ = scale dS K
// over the key blocks at or before the block, from the dK/dV kernel's dS^T.
template <int HD>
__device__ __forceinline__ void dq90(const bf16* k, const bf16* dst, bf16* dq, int H, int KV,
                                     int T, float scale) {
    constexpr uint32_t ST = QS * QS * 2, KT = QS * HD * 2;
    const uint32_t base = smem_base();
    auto sbuf = [&](int i) { return base + i * (ST + KT); };  // dS^T, K ST after it
    int qb = gridDim.y - 1 - blockIdx.y;
    int b = blockIdx.x / H, h = blockIdx.x % H, kvh = h / (H / KV), tp = padded(T);
    auto [wg, g, t, w0] = lane_of();
    const bf16* kp = k + (size_t)(b * KV + kvh) * T * HD;
    const bf16* sp = dst + (size_t)(b * H + h) * tp * tp + qb * QS;
    auto issue = [&](int kb, int buf) {
        stage_sw<QS, WG>(sbuf(buf), QS, sp, tp, kb * QS, tp);
        stage_sw<HD, WG>(sbuf(buf) + ST, QS, kp, HD, kb * QS, T);
    };
    issue(0, 0);
    cp_commit();
    float dqa[HD / 2];
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) dqa[i] = 0.0f;
    for (int kb = 0; kb <= qb; ++kb) {
        if (kb < qb) issue(kb + 1, (kb + 1) & 1);
        cp_commit();
        tiles_ready<1>();
        uint32_t ss = sbuf(kb & 1), ks = ss + ST;
        wg_fence();
#pragma unroll
        for (int i = 0; i < QS / 16; ++i) mma_tt<HD>(dqa, desc_mn(ss, QS, i), desc_mn(ks, QS, i));
        wg_commit();
        wg_wait<0>();
        hold<HD / 2>(dqa);
        __syncthreads();  // done with the buffer the next load overwrites
    }
    store_rows<HD>(dq + (size_t)(b * H + h) * T * HD, HD, qb * QS + w0, T,
                   reinterpret_cast<const float(*)[4]>(dqa), scale);
}

// The entry points, one per head dimension: flash90_<pass>_hd<HD>, one warpgroup a block
// (FWD_WGS_HD<HD> for the forward kernel and KV_WGS for the dK/dV kernel, cuda.rs:
// FLASH90_FWD_WGS and FLASH90_KV_WGS) and their blocks an SM.
// Heads of 128: the pipelined forward pass, two groups sharing the key tiles (H200, (8, 16,
// 4, 1024, 128): one group 0.160 ms against 0.165 unpipelined); heads of 64: the plain one
// (0.072 against 0.082 ms pipelined at (8, 12, 12, 1024, 64)). benches/gpu/flash90_check.cu
// times the other choices (compiled with -DFWD_WGS_HD128=1 and so on).
#ifndef FWD_WGS_HD128
#define FWD_WGS_HD128 2
#endif
#ifndef FWD_WGS_HD64
#define FWD_WGS_HD64 1
#endif
#ifndef FWD_PIPE_HD64
#define FWD_PIPE_HD64 0
#endif
template <int HD>
__device__ __forceinline__ void fwd_entry(const bf16* q, const bf16* k, const bf16* v, bf16* o,
                                          float* lse, int H, int KV, int T, float scale_log2) {
    if constexpr (HD == 128) {
        fwd90p<HD, FWD_WGS_HD128>(q, k, v, o, lse, H, KV, T, scale_log2);
    } else if constexpr (FWD_PIPE_HD64) {
        fwd90p<HD, FWD_WGS_HD64>(q, k, v, o, lse, H, KV, T, scale_log2);
    } else {
        fwd90<HD, FWD_WGS_HD64>(q, k, v, o, lse, H, KV, T, scale_log2);
    }
}
#ifndef KV_WGS
#define KV_WGS 1
#define KV_MIN 2
#endif
#define FLASH90_KERNELS(HD)                                                                   \
    extern "C" __global__ void __launch_bounds__(WG * FWD_WGS_HD##HD, 2 / FWD_WGS_HD##HD)    \
        flash90_fwd_hd##HD(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,   \
                           int H, int KV, int T, float scale_log2) {                           \
        fwd_entry<HD>(q, k, v, o, lse, H, KV, T, scale_log2);                                 \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(WG) flash90_dsum_hd##HD(                     \
        const bf16* o, const bf16* dout, float* dsum, int H, int T) {                         \
        dsum90<HD>(o, dout, dsum, H, T);                                                      \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(WG * KV_WGS, KV_MIN) flash90_kv_hd##HD(    \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,      \
        const float* dsum, bf16* dk, bf16* dv, bf16* dst, int H, int KV, int T,               \
        float scale_log2, float scale) {                                                      \
        kv90<HD, KV_WGS>(q, k, v, dout, lse, dsum, dk, dv, dst, H, KV, T, scale_log2, scale); \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(WG, 3) flash90_q_hd##HD(                    \
        const bf16* k, const bf16* dst, bf16* dq, int H, int KV, int T, float scale) {        \
        dq90<HD>(k, dst, dq, H, KV, T, scale);                                                \
    }

FLASH90_KERNELS(64)
FLASH90_KERNELS(128)
