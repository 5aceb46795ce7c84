// The Hopper flash kernels (components/src/fused/flash_sm90.cu) against the mma.sync ones
// (flash.cu, which the components' tests hold to the CPU's attention), on the same bf16
// inputs, and both timed: a lease's quick check before the Rust build carries them. On the
// GPU machine:
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a -I components/src/fused \
//       -o /tmp/flash90_check benches/gpu/flash90_check.cu && /tmp/flash90_check
// (add -DFWD_WGS_HD128=1 and the like, flash_sm90.cu's entry points, to time other choices)
// prints, per shape, the largest difference of O, the log-sum-exp, dQ, dK and dV relative to
// the largest value, and each pass's time in both.

#include "flash.cu"
#include "flash_sm90.cu"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#define CK(x)                                                                         \
    do {                                                                              \
        cudaError_t e = (x);                                                          \
        if (e != cudaSuccess) {                                                       \
            printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));          \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

struct Shape {
    int b, h, kv, t, hd;
};

static std::vector<bf16> random_bf16(size_t n, unsigned seed) {
    std::vector<bf16> x(n);
    for (size_t i = 0; i < n; ++i) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = __float2bfloat16(((seed >> 8) / 16777216.0f - 0.5f) * 3.0f);
    }
    return x;
}

template <typename T>
static T* upload(const std::vector<T>& x) {
    T* d;
    CK(cudaMalloc(&d, x.size() * sizeof(T)));
    CK(cudaMemcpy(d, x.data(), x.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

template <typename T>
static std::vector<float> download(const T* d, size_t n) {
    std::vector<T> x(n);
    CK(cudaMemcpy(x.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (size_t i = 0; i < n; ++i) f[i] = (float)x[i];
    return f;
}

static float rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
    float worst = 0.0f, top = 1e-6f;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite(a[i])) return INFINITY;
        worst = fmaxf(worst, fabsf(a[i] - b[i]));
        top = fmaxf(top, fabsf(b[i]));
    }
    return worst / top;
}

template <typename F>
static float time_ms(F f, int reps) {
    cudaEvent_t a, b;
    cudaEventCreate(&a), cudaEventCreate(&b);
    f();
    CK(cudaDeviceSynchronize());
    cudaEventRecord(a);
    for (int i = 0; i < reps; ++i) f();
    cudaEventRecord(b);
    CK(cudaEventSynchronize(b));
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    return ms / reps;
}

template <typename K>
static void allow(K k, int bytes) {
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

int main() {
    int failures = 0;
    for (Shape s : {Shape{2, 4, 2, 200, 64}, Shape{1, 2, 2, 33, 128}, Shape{2, 4, 1, 200, 128},
                    Shape{2, 2, 1, 1, 128}, Shape{1, 12, 12, 1024, 64}, Shape{8, 16, 4, 1024, 128},
                    Shape{1, 16, 4, 4096, 128}, Shape{8, 12, 12, 1024, 64}}) {
        int B = s.b, H = s.h, KV = s.kv, T = s.t, HD = s.hd;
        size_t nq = (size_t)B * H * T * HD, nk = (size_t)B * KV * T * HD;
        bf16 *q = upload(random_bf16(nq, 1)), *k = upload(random_bf16(nk, 2)),
             *v = upload(random_bf16(nk, 3)), *dout = upload(random_bf16(nq, 4));
        bf16 *o[2], *dq[2], *dk[2], *dv[2];
        float *lse[2], *dsum[2];
        for (int i = 0; i < 2; ++i) {
            CK(cudaMalloc(&o[i], nq * 2));
            CK(cudaMalloc(&dq[i], nq * 2));
            CK(cudaMalloc(&dk[i], nk * 2));
            CK(cudaMalloc(&dv[i], nk * 2));
            CK(cudaMalloc(&lse[i], (size_t)B * H * T * 4));
            CK(cudaMalloc(&dsum[i], (size_t)B * H * T * 4));
        }
        float scale = 1.0f / sqrtf((float)HD), sl2 = scale * 1.4426950408889634f;
        int row = (HD + 8) * 2;
        int m_fwd = (128 + 4 * 64) * row, m_kv = (2 * 64 + 4 * 32) * row + 4 * 32 * 4,
            m_q = (2 * 64 + 4 * 32) * row;
        int fg = HD == 64 ? FWD_WGS_HD64 : FWD_WGS_HD128;  // the forward's groups a block
        int h_fwd = fg * 64 * HD * 2 + 4 * QS * HD * 2 + 1024,
            h_kv = 2 * 64 * KV_WGS * HD * 2 + 4 * QS * HD * 2 + 4 * QS * 4 + 4 * KV_WGS * 16 * DS_ROW + 1024,
            h_q = 2 * (QS * QS * 2 + QS * HD * 2) + 1024;
        int tp = (T + 63) / 64 * 64;
        bf16* dst;
        CK(cudaMalloc(&dst, (size_t)B * H * tp * tp * 2));
        auto fm = HD == 64 ? flash_fwd_hd64 : flash_fwd_hd128;
        auto km = HD == 64 ? flash_kv_hd64 : flash_kv_hd128;
        auto qm = HD == 64 ? flash_q_hd64 : flash_q_hd128;
        auto fh = HD == 64 ? flash90_fwd_hd64 : flash90_fwd_hd128;
        auto kh = HD == 64 ? flash90_kv_hd64 : flash90_kv_hd128;
        auto qh = HD == 64 ? flash90_q_hd64 : flash90_q_hd128;
        auto dh = HD == 64 ? flash90_dsum_hd64 : flash90_dsum_hd128;
        allow(fm, m_fwd), allow(km, m_kv), allow(qm, m_q), allow(fh, h_fwd), allow(kh, h_kv), allow(qh, h_q);
        auto fwd = [&](int i) {
            if (i == 0)
                fm<<<dim3(B * H, (T + 127) / 128), 128, m_fwd>>>(q, k, v, o[0], lse[0], H, KV, T, sl2);
            else
                fh<<<dim3(B * H, (T + 64 * fg - 1) / (64 * fg)), WG * fg, h_fwd>>>(
                    q, k, v, o[1], lse[1], H, KV, T, sl2);
        };
        // Both backward passes from the mma.sync forward pass's O and log-sum-exp.
        auto bwd = [&](int i) {
            if (i == 0) {
                qm<<<dim3(B * H, (T + 63) / 64), 128, m_q>>>(q, k, v, o[0], dout, lse[0], dsum[0], dq[0], H, KV, T, sl2, scale);
                km<<<dim3(B * KV, (T + 63) / 64), 128, m_kv>>>(q, k, v, dout, lse[0], dsum[0], dk[0], dv[0], H, KV, T, sl2, scale);
            } else {
                dh<<<dim3(B * H, tp / 64), WG>>>(o[0], dout, dsum[1], H, T);
                kh<<<dim3(B * KV, (T + 64 * KV_WGS - 1) / (64 * KV_WGS)), WG * KV_WGS, h_kv>>>(
                    q, k, v, dout, lse[0], dsum[1], dk[1], dv[1], dst, H, KV, T, sl2, scale);
                qh<<<dim3(B * H, tp / 64), WG, h_q>>>(k, dst, dq[1], H, KV, T, scale);
            }
        };
        fwd(0), fwd(1), bwd(0), bwd(1);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        float e[6] = {rel_diff(download(o[1], nq), download(o[0], nq)),
                      rel_diff(download(lse[1], (size_t)B * H * T), download(lse[0], (size_t)B * H * T)),
                      rel_diff(download(dsum[1], (size_t)B * H * T), download(dsum[0], (size_t)B * H * T)),
                      rel_diff(download(dq[1], nq), download(dq[0], nq)),
                      rel_diff(download(dk[1], nk), download(dk[0], nk)),
                      rel_diff(download(dv[1], nk), download(dv[0], nk))};
        bool ok = true;
        for (float x : e) ok &= x < 1e-2f;
        failures += !ok;
        printf("(%d, %d, %d, %d, %d) %s: O %.2e lse %.2e D %.2e dQ %.2e dK %.2e dV %.2e\n", B, H, KV, T, HD,
               ok ? "PASS" : "FAIL", e[0], e[1], e[2], e[3], e[4], e[5]);
        if (T >= 1024) {
            // Causal FLOPs: forward 2 products, backward 5 (as FlashAttention counts them).
            double f = 2.0 * B * H * (double)T * T / 2 * HD * 2;
            float t0 = time_ms([&] { fwd(0); }, 20), t1 = time_ms([&] { fwd(1); }, 20);
            float b0 = time_ms([&] { bwd(0); }, 20), b1 = time_ms([&] { bwd(1); }, 20);
            float q0 = time_ms([&] { qm<<<dim3(B * H, (T + 63) / 64), 128, m_q>>>(q, k, v, o[0], dout, lse[0], dsum[0], dq[0], H, KV, T, sl2, scale); }, 20);
            float q1 = time_ms([&] { qh<<<dim3(B * H, tp / 64), WG, h_q>>>(k, dst, dq[1], H, KV, T, scale); }, 20);
            float d1 = time_ms([&] { dh<<<dim3(B * H, tp / 64), WG>>>(o[0], dout, dsum[1], H, T); }, 20);
            printf("    mma.sync: dQ kernel %.3f ms, dK/dV %.3f; wgmma: D %.3f, dK/dV and dS %.3f, dQ %.3f\n", q0, b0 - q0, d1, b1 - q1 - d1, q1);
            printf("    fwd mma.sync %.3f ms (%.0f TFLOP/s), wgmma %.3f ms (%.0f); bwd mma.sync %.3f ms (%.0f), wgmma %.3f ms (%.0f)\n",
                   t0, f / t0 / 1e9, t1, f / t1 / 1e9, b0, 2.5 * f / b0 / 1e9, b1, 2.5 * f / b1 / 1e9);
        }
        for (int i = 0; i < 2; ++i) {
            cudaFree(o[i]), cudaFree(dq[i]), cudaFree(dk[i]), cudaFree(dv[i]), cudaFree(lse[i]), cudaFree(dsum[i]);
        }
        cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(dout), cudaFree(dst);
    }
    printf("%s\n", failures ? "SOME SHAPES FAIL" : "every shape agrees");
    return failures ? 1 : 0;
}
