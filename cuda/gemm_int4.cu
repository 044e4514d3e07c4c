// int4 GEMM on packed operands (two signed 4-bit values per byte, low nibble = even k) with fused
// requantization. A: Mp x Kp/2 bytes, B: Np x Kp/2 bytes (Mp, Np multiples of 128, Kp a multiple of 64).
// Tiles are unpacked to int8 in shared memory and multiplied with __dp4a.
#include "common.cuh"

#define I4_BM 64
#define I4_BN 64
#define I4_BKW 16  // 64 k values per tile: 8 packed words in, 16 int8x4 words in shared memory

__device__ __forceinline__ int oq_nib(unsigned w, int i) { return (int)((w >> (4 * i)) & 0xF) ^ 8; }

// 8 nibbles -> two words of 4 sign-extended int8
__device__ __forceinline__ void oq_unpack8(unsigned w, int& lo, int& hi) {
    unsigned r[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) r[i] = (unsigned)((oq_nib(w, i) - 8) & 0xFF);
    lo = (int)(r[0] | (r[1] << 8) | (r[2] << 16) | (r[3] << 24));
    hi = (int)(r[4] | (r[5] << 8) | (r[6] << 16) | (r[7] << 24));
}

extern "C" __global__ void __launch_bounds__(256) gemm_s4_dp4a(const unsigned char* __restrict__ A,
                                                               const unsigned char* __restrict__ B, int Mp,
                                                               int Np, int Kp, int M, int N, OQ_EPILOGUE_PARAMS) {
    OQ_EPILOGUE_MAKE;
    __shared__ int As[I4_BM][I4_BKW + 1];
    __shared__ int Bs[I4_BN][I4_BKW + 1];
    const int g = blockIdx.z;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int r0 = blockIdx.y * I4_BM, c0 = blockIdx.x * I4_BN;
    const int pw = Kp / 8;  // packed words per row
    const unsigned* Ag = (const unsigned*)(A + (long long)g * Mp * (Kp / 2));
    const unsigned* Bg = (const unsigned*)(B + (long long)g * Np * (Kp / 2));
    int acc[4][4] = {};
    for (int k0 = 0; k0 < pw; k0 += I4_BKW / 2) {
        for (int i = tid; i < I4_BM * (I4_BKW / 2); i += 256) {
            const int row = i / (I4_BKW / 2), col = i % (I4_BKW / 2);
            int lo, hi;
            oq_unpack8(Ag[(long long)(r0 + row) * pw + k0 + col], lo, hi);
            As[row][2 * col] = lo;
            As[row][2 * col + 1] = hi;
            oq_unpack8(Bg[(long long)(c0 + row) * pw + k0 + col], lo, hi);
            Bs[row][2 * col] = lo;
            Bs[row][2 * col + 1] = hi;
        }
        __syncthreads();
        oq_dp4a_tile<I4_BKW>(As, Bs, tx, ty, acc);
        __syncthreads();
    }
    oq_store_patch(ep, g, r0 + ty, c0 + tx, M, N, acc);
}

// Pack int8 values in [-8, 7] two per byte (low nibble = even index): P[i] = A[2i] | A[2i+1] << 4.
extern "C" __global__ void pack_s4(const signed char* __restrict__ A, unsigned char* __restrict__ P, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        P[i] = (unsigned char)((A[2 * i] & 0xF) | ((A[2 * i + 1] & 0xF) << 4));
}
