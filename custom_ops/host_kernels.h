// The CUDA vocabulary the kernels use, defined for an ordinary C++ compiler.
//
// With STYLEX_HOST_KERNELS defined, bias_act.cu and upfirdn2d.cu compile as host C++ and a
// launch runs every (block, thread) of the grid in turn on the CPU. The kernels use no shared
// memory, barriers or warp operations, and each thread writes only its own outputs, so running
// the threads one after another computes exactly what the GPU computes (up to the libm used for
// exp/tanh). This lets the kernels' index arithmetic, padding, layouts, fast division, path
// choice and 16-bit conversions be tested against the reference on machines without a GPU.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

using cudaStream_t = void*;

struct HostDim3 {
    unsigned x = 0, y = 1, z = 1;
};

// The launch coordinates of the thread being run (one thread at a time per OS thread).
inline thread_local HostDim3 blockIdx, threadIdx, blockDim, gridDim;

template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

inline uint32_t __umulhi(uint32_t a, uint32_t b) {
    return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// 16-bit floats: the same storage as the device types, converted with round-to-nearest-even.
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.bits, c10::Half::from_bits())); }
inline float __bfloat162float(__nv_bfloat16 h) {
    return static_cast<float>(c10::BFloat16(h.bits, c10::BFloat16::from_bits()));
}
inline __half __float2half_rn(float v) { return __half{c10::Half(v).x}; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16{c10::BFloat16(v).x}; }

namespace stylex {

// A kernel launch run sequentially: grid-major, then thread within the block.
template <typename... Params>
struct HostLaunch {
    unsigned grid, block;
    void (*kernel)(Params...);

    template <typename... Args>
    void operator()(Args&&... args) const {
        gridDim = HostDim3{grid, 1, 1};
        blockDim = HostDim3{block, 1, 1};
        for (unsigned b = 0; b < grid; ++b) {
            blockIdx = HostDim3{b, 0, 0};
            for (unsigned t = 0; t < block; ++t) {
                threadIdx = HostDim3{t, 0, 0};
                kernel(args...);
            }
        }
    }
};

template <typename... Params>
HostLaunch<Params...> host_launch(unsigned grid, unsigned block, void (*kernel)(Params...)) {
    return HostLaunch<Params...>{grid, block, kernel};
}

}  // namespace stylex

#define STYLEX_LAUNCH(grid, block, stream, ...) ::stylex::host_launch((grid), (block), &__VA_ARGS__)
