// upfirdn2d: one thread per output sample, gathering the input samples its filter window covers.
//
// Output sample (oy, ox) is the filter window placed at (oy * down_y, ox * down_x) in the padded,
// zero-inserted signal. Padded coordinate q is upsampled coordinate u = q - pad0, and only the
// u that are multiples of `up` hold input samples (at index u / up), so of the K taps along an
// axis only about K / up ever touch data: the thread finds the first such tap and then steps by
// `up`. The zero-inserted signal is never materialised.
//
// The specialised kernels fix the taps and factors at compile time (StyleGAN2's 4-tap filter with
// factor 2), which turns the stepping loops into straight-line code with constant divisions.

#include <cstdint>

#include "dtype_io.cuh"
#include "stylex_ops.h"

namespace stylex {
namespace {

// First tap (0-based) of an axis that lands on an input sample, and that sample's index.
// u0 is the upsampled coordinate under tap 0; it is negative inside the leading padding.
__device__ __forceinline__ void first_tap(int u0, int up, int& tap, int& index) {
    if (u0 >= 0) {
        const int r = u0 % up;
        tap = r == 0 ? 0 : up - r;
    } else {
        tap = -u0;  // u = 0 is the first sample; it lies on the grid for any `up`
    }
    index = (u0 + tap) / up;
}

// KX == 0 selects the generic kernel: taps and factors come from the parameters at run time.
// SEP: the filter is the outer product of p.f (x-taps) and p.fy (y-taps).
// The loops below correlate; a convolution reads the taps in reverse (p.flip_taps), which for a
// row-major 2-D filter of n taps maps index i to n - 1 - i.
template <typename TI, typename TO, bool SEP, int KX, int KY, int UPX, int UPY, int DNX, int DNY>
__global__ void upfirdn2d_kernel(UpfirdnParams p, uint32_t total) {
    constexpr bool kFixed = KX > 0;
    const uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;

    // Decode in the output's memory order so that neighbouring threads write neighbouring memory.
    int ox, oy, ch, n;
    {
        // Peel the fastest-varying index off first: (c, x, y, n) for NHWC, (x, y, c, n) for NCHW.
        const FastDiv& d0 = p.channels_last ? p.div_c : p.div_w;
        const FastDiv& d1 = p.channels_last ? p.div_w : p.div_h;
        const FastDiv& d2 = p.channels_last ? p.div_h : p.div_c;
        const uint32_t q0 = fast_div(idx, d0);
        const uint32_t q1 = fast_div(q0, d1);
        const uint32_t q2 = fast_div(q1, d2);
        const int i0 = static_cast<int>(fast_mod(idx, q0, d0));
        const int i1 = static_cast<int>(fast_mod(q0, q1, d1));
        const int i2 = static_cast<int>(fast_mod(q1, q2, d2));
        n = static_cast<int>(q2);
        if (p.channels_last) {
            ch = i0, ox = i1, oy = i2;
        } else {
            ox = i0, oy = i1, ch = i2;
        }
    }

    const int upx = kFixed ? UPX : p.upx;
    const int upy = kFixed ? UPY : p.upy;
    const int kx = kFixed ? KX : p.fw;
    const int ky = kFixed ? KY : p.fh;
    int tx, ix0, ty, iy0;
    first_tap(ox * (kFixed ? DNX : p.downx) - p.px0, upx, tx, ix0);
    first_tap(oy * (kFixed ? DNY : p.downy) - p.py0, upy, ty, iy0);

    const TI* xp = static_cast<const TI*>(p.x) + n * p.sx_n + ch * p.sx_c;
    const float* f = p.f;
    const bool flip = p.flip_taps;
    float acc = 0.0f;

    if constexpr (kFixed) {
        // At most ceil(K / up) taps per axis land on samples.
        constexpr int kNy = (KY + UPY - 1) / UPY;
        constexpr int kNx = (KX + UPX - 1) / UPX;
#pragma unroll
        for (int j = 0; j < kNy; ++j) {
            const int a = ty + j * UPY;
            const int iy = iy0 + j;
            if (a >= KY || iy >= p.in_h) break;
            const TI* row = xp + iy * p.sx_h;
            float row_acc = 0.0f;
#pragma unroll
            for (int i = 0; i < kNx; ++i) {
                const int b = tx + i * UPX;
                const int ix = ix0 + i;
                if (b >= KX || ix >= p.in_w) break;
                const float v = Io<TI>::load(row + ix * p.sx_w);
                if (SEP) {
                    row_acc += __ldg(f + (flip ? KX - 1 - b : b)) * v;
                } else {
                    const int k = a * KX + b;
                    acc += __ldg(f + (flip ? KX * KY - 1 - k : k)) * v;
                }
            }
            if (SEP) acc += __ldg(p.fy + (flip ? KY - 1 - a : a)) * row_acc;
        }
    } else {
        const int last = kx * ky - 1;
        for (int a = ty, iy = iy0; a < ky && iy < p.in_h; a += upy, ++iy) {
            const TI* row = xp + iy * p.sx_h;
            for (int b = tx, ix = ix0; b < kx && ix < p.in_w; b += upx, ++ix) {
                const int k = a * kx + b;
                acc += __ldg(f + (flip ? last - k : k)) * Io<TI>::load(row + ix * p.sx_w);
            }
        }
    }

    TO* y = static_cast<TO*>(p.y) + n * p.sy_n + ch * p.sy_c + oy * p.sy_h + ox * p.sy_w;
    Io<TO>::store(y, acc * p.gain);
}

template <typename TI, typename TO, bool SEP, int KX, int KY, int UPX, int UPY, int DNX, int DNY>
void launch(const UpfirdnParams& p, cudaStream_t stream) {
    constexpr int kThreads = 256;
    const int64_t total = int64_t(p.n) * p.c * p.out_h * p.out_w;  // the host keeps it < 2^31
    if (total == 0) return;
    const unsigned blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
    STYLEX_LAUNCH(blocks, kThreads, stream, upfirdn2d_kernel<TI, TO, SEP, KX, KY, UPX, UPY, DNX, DNY>)
    (p, static_cast<uint32_t>(total));
}

template <typename T, bool SEP>
void launch_specialised(const UpfirdnParams& p, UpfirdnPath path, cudaStream_t stream) {
    switch (path) {
        case UpfirdnPath::K4: launch<T, T, SEP, 4, 4, 1, 1, 1, 1>(p, stream); break;
        case UpfirdnPath::K4Up2: launch<T, T, SEP, 4, 4, 2, 2, 1, 1>(p, stream); break;
        case UpfirdnPath::K4Down2: launch<T, T, SEP, 4, 4, 1, 1, 2, 2>(p, stream); break;
        default: break;
    }
}

template <typename T>
void launch_same_type(const UpfirdnParams& p, UpfirdnPath path, cudaStream_t stream) {
    if (path == UpfirdnPath::Generic) {
        launch<T, T, false, 0, 0, 0, 0, 0, 0>(p, stream);
    } else if (p.separable) {
        launch_specialised<T, true>(p, path, stream);
    } else {
        launch_specialised<T, false>(p, path, stream);
    }
}

}  // namespace

UpfirdnPath choose_upfirdn_path(int fw, int fh, int upx, int upy, int downx, int downy) {
    if (fw != 4 || fh != 4 || upx != upy || downx != downy) return UpfirdnPath::Generic;
    if (upx == 1 && downx == 1) return UpfirdnPath::K4;
    if (upx == 2 && downx == 1) return UpfirdnPath::K4Up2;
    if (upx == 1 && downx == 2) return UpfirdnPath::K4Down2;
    return UpfirdnPath::Generic;
}

void launch_upfirdn2d(const UpfirdnParams& p, UpfirdnPath path, DType in_dtype, DType out_dtype,
                      cudaStream_t stream) {
    if (in_dtype == out_dtype) {
        switch (in_dtype) {
            case DType::Float32: launch_same_type<float>(p, path, stream); break;
            case DType::Float16: launch_same_type<__half>(p, path, stream); break;
            case DType::BFloat16: launch_same_type<__nv_bfloat16>(p, path, stream); break;
        }
        return;
    }
    // Mixed types only occur in the generic two-pass path, whose intermediate is float32.
    if (in_dtype == DType::Float32) {
        if (out_dtype == DType::Float16) launch<float, __half, false, 0, 0, 0, 0, 0, 0>(p, stream);
        if (out_dtype == DType::BFloat16) launch<float, __nv_bfloat16, false, 0, 0, 0, 0, 0, 0>(p, stream);
    } else if (out_dtype == DType::Float32) {
        if (in_dtype == DType::Float16) launch<__half, float, false, 0, 0, 0, 0, 0, 0>(p, stream);
        if (in_dtype == DType::BFloat16) launch<__nv_bfloat16, float, false, 0, 0, 0, 0, 0, 0>(p, stream);
    }
}

}  // namespace stylex
