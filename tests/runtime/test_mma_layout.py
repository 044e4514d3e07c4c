"""NumPy emulation of the tensor-core kernel `gemm_s8_mma` (cuda/gemm_int8.cu), runnable without a GPU.

The emulation has two independent halves:
  * the mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 instruction, written from the fragment layouts in the
    PTX ISA, section "Matrix Fragments for mma.m16n8k32" (.s8/.u8 A, B and .s32 C/D; within a .b32 register
    the elements go from low byte to high byte), and
  * the kernel's own index math (cp.async tile copy into the padded shared tiles, the per-lane 32-bit
    fragment loads, the epilogue's (row, col) of each accumulator), mirrored line by line.
The kernel source is checked to still contain the mirrored expressions, so the two cannot drift apart
silently. Not covered: timing/ordering of cp.async and barriers (the stages are emulated sequentially).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SOURCE = Path(__file__).resolve().parents[2] / "cuda" / "gemm_int8.cu"
BM = BN = 128
BK = 64
LD = BK + 16

# --------------------------------------------------------------- PTX ISA fragment layouts (m16n8k32, s8)
LANE = np.arange(32)[:, None]
GROUP, TIG = LANE >> 2, LANE % 4  # groupID, threadID_in_group
_IA = np.arange(16)[None, :]
A_ROW = np.where((_IA < 4) | ((_IA >= 8) & (_IA < 12)), GROUP, GROUP + 8)  # (32, 16)
A_COL = TIG * 4 + (_IA & 3) + np.where(_IA >= 8, 16, 0)
_IB = np.arange(8)[None, :]
B_ROW = TIG * 4 + (_IB & 3) + np.where(_IB >= 4, 16, 0)  # k index, (32, 8)
B_COL = np.broadcast_to(GROUP, (32, 8))  # n index
_IC = np.arange(4)[None, :]
C_ROW = GROUP + np.where(_IC >= 2, 8, 0)  # (32, 4)
C_COL = TIG * 2 + (_IC & 1)


def _bytes(regs: np.ndarray) -> np.ndarray:
    """(32, R) uint32 registers -> (32, 4R) int8 elements, low byte first."""
    return regs.astype("<u4").view(np.int8).reshape(32, -1)


def _scatter(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    count = np.zeros(shape, np.int64)
    np.add.at(count, (rows, cols), 1)
    assert (count == 1).all(), "a fragment layout must cover every matrix element exactly once"
    out = np.zeros(shape, np.int64)
    out[rows, cols] = vals
    return out


def mma_m16n8k32_s8(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a: (32, 4) u32, b: (32, 2) u32, c: (32, 4) s32 per lane -> d: (32, 4) s32 per lane, D = A @ B + C."""
    A = _scatter(A_ROW, A_COL, _bytes(a), (16, 32))
    B = _scatter(B_ROW, B_COL, _bytes(b), (32, 8))
    C = _scatter(C_ROW, C_COL, c, (16, 8))
    D = A @ B + C
    return D[C_ROW, C_COL].astype(np.int32)


def test_documented_layouts_are_bijections() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, (32, 4), dtype=np.uint64).astype(np.uint32)
    b = rng.integers(0, 2**32, (32, 2), dtype=np.uint64).astype(np.uint32)
    d = mma_m16n8k32_s8(a, b, np.zeros((32, 4), np.int32))
    A = _scatter(A_ROW, A_COL, _bytes(a), (16, 32))
    B = _scatter(B_ROW, B_COL, _bytes(b), (32, 8))
    assert (_scatter(C_ROW, C_COL, d, (16, 8)) == A @ B).all()


# --------------------------------------------------------------- the kernel's index math, mirrored

MIRRORED = [
    "#define MMA_LD (MMA_BK + 16)",
    "const int wm = warp / 4, wn = warp % 4;",
    "const int gid = lane / 4, tig = lane % 4;",
    "const int row = chunk / 4, col = (chunk % 4) * 16;",
    "oq_cp_async16(&As[stage][row][col], Ag + (long long)(r0 + row) * Kp + k0 + col);",
    "oq_cp_async16(&Bs[stage][row][col], Bg + (long long)(c0 + row) * Kp + k0 + col);",
    "const int row = wm * 64 + mi * 16 + gid;",
    "a[mi][0] = *(const unsigned*)&As[st][row][ks + tig * 4];",
    "a[mi][1] = *(const unsigned*)&As[st][row + 8][ks + tig * 4];",
    "a[mi][2] = *(const unsigned*)&As[st][row][ks + 16 + tig * 4];",
    "a[mi][3] = *(const unsigned*)&As[st][row + 8][ks + 16 + tig * 4];",
    "const int col = wn * 32 + ni * 8 + gid;",
    "b[ni][0] = *(const unsigned*)&Bs[st][col][ks + tig * 4];",
    "b[ni][1] = *(const unsigned*)&Bs[st][col][ks + 16 + tig * 4];",
    "const int r = r0 + wm * 64 + mi * 16 + gid + (h >= 2 ? 8 : 0);",
    "const int c = c0 + wn * 32 + ni * 8 + tig * 2 + (h & 1);",
    '"mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "',
    '"{%8,%9}, {%0,%1,%2,%3};\\n"',
]


def test_kernel_source_still_matches_the_emulation() -> None:
    text = " ".join(SOURCE.read_text().split())
    missing = [m for m in MIRRORED if " ".join(m.split()) not in text]
    assert not missing, missing


def _u32(tile: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """*(const unsigned*)&tile[row][col] for per-lane row/col arrays (little-endian, 4-byte aligned)."""
    assert (col % 4 == 0).all() and (col + 4 <= LD).all()
    raw = np.stack([tile[row, col + j] for j in range(4)], axis=-1)
    return raw.view("<u4")[..., 0]


def emulate_block(A: np.ndarray, B: np.ndarray, by: int, bx: int) -> np.ndarray:
    """One thread block of gemm_s8_mma in OQ_MODE_RAW; returns the block's 128x128 int32 output (-1 unset)."""
    Kp = A.shape[1]
    rng = np.random.default_rng(1)
    # the padding columns hold junk: a read of them would corrupt the result
    As = rng.integers(-128, 128, (2, BM, LD), dtype=np.int8)
    Bs = rng.integers(-128, 128, (2, BN, LD), dtype=np.int8)
    r0, c0 = by * BM, bx * BN
    tid = np.arange(256)
    lane = np.arange(32)
    gid, tig = lane // 4, lane % 4

    def load(stage: int, k0: int) -> None:
        for i in range(2):
            chunk = tid + i * 256
            row, col = chunk // 4, (chunk % 4) * 16
            # cp.async.cg ... 16 needs 16-byte aligned shared and global addresses (shared tiles are
            # __align__(16), global buffers are allocation-aligned)
            assert ((stage * BM * LD + row * LD + col) % 16 == 0).all() and (col + 16 <= BK).all()
            assert (((r0 + row) * Kp + k0 + col) % 16 == 0).all()
            for t in range(256):
                As[stage, row[t], col[t] : col[t] + 16] = A[r0 + row[t], k0 + col[t] : k0 + col[t] + 16]
                Bs[stage, row[t], col[t] : col[t] + 16] = B[c0 + row[t], k0 + col[t] : k0 + col[t] + 16]

    acc = np.zeros((8, 4, 4, 32, 4), np.int32)  # warp, mi, ni, lane, h
    kt_count = Kp // BK
    load(0, 0)
    for kt in range(kt_count):
        if kt + 1 < kt_count:
            load((kt + 1) & 1, (kt + 1) * BK)
        st = kt & 1
        for warp in range(8):
            wm, wn = warp // 4, warp % 4
            for ks in range(0, BK, 32):
                a = np.zeros((4, 32, 4), np.uint32)
                b = np.zeros((4, 32, 2), np.uint32)
                for mi in range(4):
                    row = wm * 64 + mi * 16 + gid
                    a[mi, :, 0] = _u32(As[st], row, ks + tig * 4)
                    a[mi, :, 1] = _u32(As[st], row + 8, ks + tig * 4)
                    a[mi, :, 2] = _u32(As[st], row, ks + 16 + tig * 4)
                    a[mi, :, 3] = _u32(As[st], row + 8, ks + 16 + tig * 4)
                for ni in range(4):
                    col = wn * 32 + ni * 8 + gid
                    b[ni, :, 0] = _u32(Bs[st], col, ks + tig * 4)
                    b[ni, :, 1] = _u32(Bs[st], col, ks + 16 + tig * 4)
                for mi in range(4):
                    for ni in range(4):
                        acc[warp, mi, ni] = mma_m16n8k32_s8(a[mi], b[ni], acc[warp, mi, ni])
    out = np.full((BM, BN), -1, np.int64)
    written = np.zeros((BM, BN), np.int64)
    for warp in range(8):
        wm, wn = warp // 4, warp % 4
        for mi in range(4):
            for ni in range(4):
                for h in range(4):
                    r = r0 + wm * 64 + mi * 16 + gid + (8 if h >= 2 else 0)
                    c = c0 + wn * 32 + ni * 8 + tig * 2 + (h & 1)
                    out[r - r0, c - c0] = acc[warp, mi, ni, :, h]
                    np.add.at(written, (r - r0, c - c0), 1)
    assert (written == 1).all(), "every output element of the block is stored exactly once"
    return out


@pytest.mark.parametrize("by, bx", [(0, 0), (1, 1)])
def test_emulated_kernel_block_equals_matmul(by: int, bx: int) -> None:
    rng = np.random.default_rng(2)
    Mp, Np, Kp = 256, 256, 128  # two k tiles: both shared-memory stages are used
    A = rng.integers(-128, 128, (Mp, Kp), dtype=np.int8)
    B = rng.integers(-128, 128, (Np, Kp), dtype=np.int8)
    A[0, :], B[0, :] = -128, -128  # the extreme product
    out = emulate_block(A, B, by, bx)
    ref = A[by * BM : (by + 1) * BM].astype(np.int64) @ B[bx * BN : (bx + 1) * BN].astype(np.int64).T
    assert (out == ref).all()
