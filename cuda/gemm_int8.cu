// int8 GEMM with fused requantization: C[g, r, c] = sum_k A[g, r, k] * B[g, c, k] (A: Mp x Kp, B: Np x Kp,
// both row-major int8 with k contiguous; Mp, Np multiples of 128 and Kp a multiple of 64, zero padded).
//   gemm_s8_dp4a: any sm_61+ GPU, __dp4a on 64x64 tiles.
//   gemm_s8_mma:  sm_80+, tensor cores (mma.sync.m16n8k32 s8), 128x128x64 tiles, cp.async double buffering.
//   row_sums_s8:  rowsum[g, r] = sum_k A[g, r, k] (needed only when weight zero points are non-zero).
#include "common.cuh"

extern "C" __global__ void row_sums_s8(const signed char* __restrict__ A, int Mp, int Kp, int* __restrict__ out) {
    const int g = blockIdx.y;
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= Mp) return;
    const int* row = (const int*)(A + ((long long)g * Mp + r) * Kp);
    int s = 0;
    for (int k = 0; k < Kp / 4; ++k) s = __dp4a(row[k], 0x01010101, s);
    out[g * Mp + r] = s;
}

#define DP_BM 64
#define DP_BN 64
#define DP_BKW 8  // 32 bytes of k per tile, as int words

extern "C" __global__ void __launch_bounds__(256) gemm_s8_dp4a(const signed char* __restrict__ A,
                                                               const signed char* __restrict__ B, int Mp, int Np,
                                                               int Kp, int M, int N, OQ_EPILOGUE_PARAMS) {
    OQ_EPILOGUE_MAKE;
    __shared__ int As[DP_BM][DP_BKW + 1];
    __shared__ int Bs[DP_BN][DP_BKW + 1];
    const int g = blockIdx.z;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int r0 = blockIdx.y * DP_BM, c0 = blockIdx.x * DP_BN;
    const int kw = Kp / 4;
    const int* Ag = (const int*)(A + (long long)g * Mp * Kp);
    const int* Bg = (const int*)(B + (long long)g * Np * Kp);
    int acc[4][4] = {};
    for (int k0 = 0; k0 < kw; k0 += DP_BKW) {
        for (int i = tid; i < DP_BM * DP_BKW; i += 256) {
            const int row = i / DP_BKW, col = i % DP_BKW;
            As[row][col] = Ag[(long long)(r0 + row) * kw + k0 + col];
            Bs[row][col] = Bg[(long long)(c0 + row) * kw + k0 + col];
        }
        __syncthreads();
        oq_dp4a_tile<DP_BKW>(As, Bs, tx, ty, acc);
        __syncthreads();
    }
    oq_store_patch(ep, g, r0 + ty, c0 + tx, M, N, acc);
}

#define MMA_BM 128
#define MMA_BN 128
#define MMA_BK 64
#define MMA_LD (MMA_BK + 16)  // 80-byte rows: fragment loads are free of bank conflicts

__device__ __forceinline__ void oq_cp_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#endif
}

extern "C" __global__ void __launch_bounds__(256) gemm_s8_mma(const signed char* __restrict__ A,
                                                              const signed char* __restrict__ B, int Mp, int Np,
                                                              int Kp, int M, int N, OQ_EPILOGUE_PARAMS) {
#if __CUDA_ARCH__ >= 800
    OQ_EPILOGUE_MAKE;
    __shared__ __align__(16) signed char As[2][MMA_BM][MMA_LD];
    __shared__ __align__(16) signed char Bs[2][MMA_BN][MMA_LD];
    const int g = blockIdx.z;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = warp / 4, wn = warp % 4;  // 2 x 4 warps, each 64 x 32
    const int gid = lane / 4, tig = lane % 4;
    const int r0 = blockIdx.y * MMA_BM, c0 = blockIdx.x * MMA_BN;
    const signed char* Ag = A + (long long)g * Mp * Kp;
    const signed char* Bg = B + (long long)g * Np * Kp;
    int acc[4][4][4] = {};

    auto load = [&](int stage, int k0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int chunk = tid + i * 256;          // 512 chunks of 16 bytes per operand tile
            const int row = chunk / 4, col = (chunk % 4) * 16;
            oq_cp_async16(&As[stage][row][col], Ag + (long long)(r0 + row) * Kp + k0 + col);
            oq_cp_async16(&Bs[stage][row][col], Bg + (long long)(c0 + row) * Kp + k0 + col);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

    const int kt_count = Kp / MMA_BK;
    load(0, 0);
    for (int kt = 0; kt < kt_count; ++kt) {
        if (kt + 1 < kt_count) {
            load((kt + 1) & 1, (kt + 1) * MMA_BK);
        } else {
            asm volatile("cp.async.commit_group;\n" ::);
        }
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();
        const int st = kt & 1;
#pragma unroll
        for (int ks = 0; ks < MMA_BK; ks += 32) {
            unsigned a[4][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const int row = wm * 64 + mi * 16 + gid;
                a[mi][0] = *(const unsigned*)&As[st][row][ks + tig * 4];
                a[mi][1] = *(const unsigned*)&As[st][row + 8][ks + tig * 4];
                a[mi][2] = *(const unsigned*)&As[st][row][ks + 16 + tig * 4];
                a[mi][3] = *(const unsigned*)&As[st][row + 8][ks + 16 + tig * 4];
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int col = wn * 32 + ni * 8 + gid;
                b[ni][0] = *(const unsigned*)&Bs[st][col][ks + tig * 4];
                b[ni][1] = *(const unsigned*)&Bs[st][col][ks + 16 + tig * 4];
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
                    asm volatile(
                        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                        "{%8,%9}, {%0,%1,%2,%3};\n"
                        : "+r"(acc[mi][ni][0]), "+r"(acc[mi][ni][1]), "+r"(acc[mi][ni][2]), "+r"(acc[mi][ni][3])
                        : "r"(a[mi][0]), "r"(a[mi][1]), "r"(a[mi][2]), "r"(a[mi][3]), "r"(b[ni][0]),
                          "r"(b[ni][1]));
        }
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const int r = r0 + wm * 64 + mi * 16 + gid + (h >= 2 ? 8 : 0);
                const int c = c0 + wn * 32 + ni * 8 + tig * 2 + (h & 1);
                if (r < M && c < N) oq_store(ep, g, r, c, acc[mi][ni][h]);
            }
#endif
}
