// Loads and stores that move float16 / bfloat16 / float32 values through float32 arithmetic,
// and the device side of FastDiv.
#pragma once

#include <cstdint>

#ifndef STYLEX_HOST_KERNELS
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "stylex_ops.h"

namespace stylex {

// n / d for 0 <= n < 2^31 (see FastDiv), and n % d given that quotient.
__device__ __forceinline__ uint32_t fast_div(uint32_t n, const FastDiv& f) {
    return (__umulhi(n, f.m) + n) >> f.s;
}

__device__ __forceinline__ uint32_t fast_mod(uint32_t n, uint32_t q, const FastDiv& f) { return n - q * f.d; }

template <typename T>
struct Io;

template <>
struct Io<float> {
    static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
    static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};

template <>
struct Io<__half> {
    static __device__ __forceinline__ float load(const __half* p) {
        // Read the raw bits: __ldg overloads for the 16-bit float types vary with the architecture.
        return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
    }
    static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};

template <>
struct Io<__nv_bfloat16> {
    static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
        return __bfloat162float(__ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p))));
    }
    static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

}  // namespace stylex
