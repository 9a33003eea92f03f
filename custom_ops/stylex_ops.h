// Launch parameters shared by the host bindings (stylex_ops.cpp) and the kernels (*.cu).
//
// The kernel files include only CUDA headers, never the PyTorch ones, so that nvcc stays quick;
// everything that touches at::Tensor lives in stylex_ops.cpp.
#pragma once

#include <cstdint>

#ifdef STYLEX_HOST_KERNELS
#include "host_kernels.h"  // the kernels compiled for the CPU, for tests without a GPU
#else
#include <cuda_runtime.h>
// kernel<<<grid, block, 0, stream>>>, spelled so that host_kernels.h can run the same launch.
#define STYLEX_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

namespace stylex {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Division by a run-time constant d as a multiply-high, add and shift: q = (mulhi(n, m) + n) >> s
// with s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1 (Granlund & Montgomery, 1994).
// Exact for 0 <= n < 2^31 and 1 <= d <= 2^31, which the launchers guarantee. A hardware 32-bit
// division costs about twenty instructions, which index arithmetic would otherwise pay per element.
struct FastDiv {
    uint32_t d;
    uint32_t m;
    uint32_t s;
};

inline FastDiv make_fast_div(uint32_t d) {
    uint32_t s = 0;
    while ((uint64_t(1) << s) < d) ++s;
    const uint64_t m = ((uint64_t(1) << 32) * ((uint64_t(1) << s) - d)) / d + 1;
    return FastDiv{d, static_cast<uint32_t>(m), s};
}

// ---------------------------------------------------------------------------------------------
// bias_act: y = clamp(act(x + b) * gain) and its first two derivatives with respect to x.
// ---------------------------------------------------------------------------------------------

struct BiasActParams {
    const void* x;       // input; every tensor below shares its (dense) memory layout
    const void* b;       // bias [bias_size], or nullptr
    const void* g1;      // order >= 1: incoming gradient
    const void* g2;      // order == 2: gradient flowing into the first-order result
    void* out;           // result, same layout as x
    int64_t numel;       // elements of x
    int64_t bias_stride; // memory stride (elements) of the dimension that b runs along
    int64_t bias_size;   // length of that dimension
    FastDiv div_stride;  // bias_stride and bias_size for 32-bit indexing (numel < 2^31)
    FastDiv div_size;
    int act;             // activation code (see bias_act.py: ACTIVATIONS[name].code)
    int order;           // 0: value; 1: g1 * d/dz; 2: g2 * g1 * d2/dz2 (z = x + b)
    float alpha;         // lrelu slope
    float gain;          // output scale
    float clamp;         // clamp magnitude; < 0 means none
};

void launch_bias_act(const BiasActParams& p, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// upfirdn2d: zero insertion, padding, FIR filter, decimation, gain.
// ---------------------------------------------------------------------------------------------

struct UpfirdnParams {
    const void* x;                       // input [n, c, in_h, in_w], any strides
    void* y;                             // output [n, c, out_h, out_w]
    const float* f;                      // 2-D: [fh * fw] row-major; separable: the x-taps [fw]
    const float* fy;                     // separable: the y-taps [fh]; unused otherwise
    bool flip_taps;                      // convolve (reverse the taps) rather than correlate
    int n, c, in_h, in_w, out_h, out_w;  // sizes
    int64_t sx_n, sx_c, sx_h, sx_w;      // input strides, elements
    int64_t sy_n, sy_c, sy_h, sy_w;      // output strides, elements
    int upx, upy, downx, downy;          // integer factors >= 1
    int px0, py0;                        // leading padding (negative crops); the trailing side
                                         // follows from out_w / out_h
    int fw, fh;                          // taps along x and y
    bool separable;                      // f holds two 1-D filters
    bool channels_last;                  // output is NHWC: threads run along channels
    FastDiv div_c, div_w, div_h;         // c, out_w, out_h: decode a thread's output index
    float gain;                          // output scale
};

// Which kernel computes a call. The specialised ones fix the filter size and factors at
// compile time (the configurations StyleGAN2 uses); the generic one takes anything.
enum class UpfirdnPath : int {
    Generic = 0,  // any filter, factors and padding (separable filters as two 1-D passes)
    K4 = 1,       // 4x4 taps, up = down = 1
    K4Up2 = 2,    // 4x4 taps, up = 2 on both axes, down = 1
    K4Down2 = 3,  // 4x4 taps, up = 1, down = 2 on both axes
};

UpfirdnPath choose_upfirdn_path(int fw, int fh, int upx, int upy, int downx, int downy);
void launch_upfirdn2d(const UpfirdnParams& p, UpfirdnPath path, DType in_dtype, DType out_dtype,
                      cudaStream_t stream);

}  // namespace stylex
