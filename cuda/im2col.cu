// im2col for int8 NCHW input into the GEMM A operand: A[g, r, k] with r = n*OH*OW + oh*OW + ow and
// k = (c*KH + i)*KW + j for the group's input channel c; positions in the padding read pad_value (the
// activation zero point, so that x - z = 0 there); rows >= M and columns >= K are 0.
#include "common.cuh"

extern "C" __global__ void im2col_s8(const signed char* __restrict__ x, signed char* __restrict__ A, int G, int Mp,
                                     int Kp, int N, int C, int H, int W, int KH, int KW, int SH, int SW, int PH,
                                     int PW, int DH, int DW, int OH, int OW, int pad_value) {
    const int Cg = C / G, K = Cg * KH * KW, M = N * OH * OW;
    const long long total = (long long)G * Mp * Kp;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int k = (int)(idx % Kp);
        const long long gr = idx / Kp;
        const int r = (int)(gr % Mp), g = (int)(gr / Mp);
        signed char v = 0;
        if (r < M && k < K) {
            const int j = k % KW, i = (k / KW) % KH, c = k / (KW * KH);
            const int ow = r % OW, oh = (r / OW) % OH, n = r / (OW * OH);
            const int h = oh * SH - PH + i * DH, w = ow * SW - PW + j * DW;
            v = (h >= 0 && h < H && w >= 0 && w < W)
                    ? x[(((long long)n * C + g * Cg + c) * H + h) * W + w]
                    : (signed char)pad_value;
        }
        A[idx] = v;
    }
}
