// Shared helpers for the onnxquant integer kernels: the requantization epilogue, bit-identical to
// onnxquant/runtime/requant.py.
//   float mode:  v = float(acc) * scale (one IEEE float32 multiply, no FMA), clamp to [lo - zp, hi - zp],
//                round half to even, + zp                      (ONNX Runtime's MlasRequantizeOutput)
//   fixed mode:  gemmlowp MultiplyByQuantizedMultiplier(acc, mult, shift) + zp, clamp to [lo, hi]
#pragma once
#include <stdint.h>

#define OQ_MODE_FLOAT 0
#define OQ_MODE_FIXED 1
#define OQ_MODE_RAW 2  // store the int32 accumulator (benchmarks, tests)

__device__ __forceinline__ int oq_requant_float(int acc, float scale, int zp, int lo, int hi) {
    float v = __fmul_rn(__int2float_rn(acc), scale);
    v = fminf(fmaxf(v, (float)(lo - zp)), (float)(hi - zp));
    return __float2int_rn(v) + zp;
}

// gemmlowp SaturatingRoundingDoublingHighMul
__device__ __forceinline__ int oq_srdhm(int a, int b) {
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    long long ab = (long long)a * (long long)b;
    long long nudge = ab >= 0 ? (1ll << 30) : (1ll - (1ll << 30));
    return (int)((ab + nudge) / (1ll << 31));  // C division truncates toward zero, as gemmlowp
}

// gemmlowp RoundingDivideByPOT: arithmetic shift rounding half away from zero
__device__ __forceinline__ int oq_rdbpot(int x, int exponent) {
    const int mask = (int)((1ll << exponent) - 1);
    const int remainder = x & mask;
    const int threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

__device__ __forceinline__ int oq_requant_fixed(int acc, int mult, int shift, int zp, int lo, int hi) {
    const int left = shift > 0 ? shift : 0;
    const int right = shift > 0 ? 0 : -shift;
    long long shifted = (long long)acc << left;  // saturating, as requant.multiply_by_quantized_multiplier
    shifted = shifted > INT32_MAX ? INT32_MAX : (shifted < INT32_MIN ? INT32_MIN : shifted);
    int y = oq_rdbpot(oq_srdhm((int)shifted, mult), right) + zp;
    return y < lo ? lo : (y > hi ? hi : y);
}

// Parameters of the fused epilogue. acc = raw + bias[c] - wzp[c] * rowsum[r] (wrapping int32 arithmetic: the
// zero-point corrections are exact modulo 2^32 and the true accumulator is proven to fit in int32), then
// requantized and stored at out + g*out_gstride + (r / L)*s_img + (r % L)*s_row + c*s_col.
struct OqEpilogue {
    const int* bias;
    const int* wzp;      // null when every weight zero point is 0
    const int* rowsum;   // (G, Mp), null when wzp is null
    const float* scale;
    const int* mult;
    const int* shift;
    int ep_gstride;      // per-group stride of bias/wzp/scale/mult/shift (Np)
    int row_gstride;     // per-group stride of rowsum (Mp)
    int mode, zp, lo, hi;
    void* out;
    long long out_gstride, s_img, s_row, s_col;
    int L;
};

__device__ __forceinline__ void oq_store(const OqEpilogue& ep, int g, int r, int c, int raw) {
    const int e = g * ep.ep_gstride + c;
    unsigned acc = (unsigned)raw + (unsigned)ep.bias[e];
    if (ep.wzp != nullptr) acc -= (unsigned)ep.wzp[e] * (unsigned)ep.rowsum[g * ep.row_gstride + r];
    const long long off = g * ep.out_gstride + (long long)(r / ep.L) * ep.s_img +
                          (long long)(r % ep.L) * ep.s_row + (long long)c * ep.s_col;
    if (ep.mode == OQ_MODE_RAW) {
        ((int*)ep.out)[off] = (int)acc;
        return;
    }
    const int q = ep.mode == OQ_MODE_FLOAT ? oq_requant_float((int)acc, ep.scale[e], ep.zp, ep.lo, ep.hi)
                                           : oq_requant_fixed((int)acc, ep.mult[e], ep.shift[e], ep.zp, ep.lo, ep.hi);
    ((signed char*)ep.out)[off] = (signed char)(q & 0xFF);
}

// Kernel parameter list of the epilogue (PyCUDA passes scalars and pointers, not structs).
#define OQ_EPILOGUE_PARAMS                                                                              \
    const int *bias, const int *wzp, const int *rowsum, const float *scale, const int *mult,            \
        const int *shift, int ep_gstride, int row_gstride, int mode, int zp, int lo, int hi, void *out, \
        long long out_gstride, long long s_img, long long s_row, long long s_col, int L
#define OQ_EPILOGUE_MAKE                                                                               \
    const OqEpilogue ep{bias, wzp, rowsum, scale, mult, shift, ep_gstride, row_gstride, mode, zp, lo, hi, \
                        out, out_gstride, s_img, s_row, s_col, L}

// One shared-memory k-tile of the dp4a GEMMs: each thread (tx, ty) of a 16x16 block accumulates a 4x4 patch
// (rows ty + 16 i, columns tx + 16 j) of int8x4 dot products over the tile's BKW words.
template <int BKW, int ROWS>
__device__ __forceinline__ void oq_dp4a_tile(const int (&As)[ROWS][BKW + 1], const int (&Bs)[ROWS][BKW + 1],
                                             int tx, int ty, int (&acc)[4][4]) {
#pragma unroll
    for (int kk = 0; kk < BKW; ++kk) {
        int a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            a[i] = As[ty + 16 * i][kk];
            b[i] = Bs[tx + 16 * i][kk];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
    }
}

// Stores the 4x4 patch of oq_dp4a_tile: rows r + 16 i, columns c + 16 j, inside the M x N output.
__device__ __forceinline__ void oq_store_patch(const OqEpilogue& ep, int g, int r, int c, int M, int N,
                                               const int (&acc)[4][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (r + 16 * i < M && c + 16 * j < N) oq_store(ep, g, r + 16 * i, c + 16 * j, acc[i][j]);
}
