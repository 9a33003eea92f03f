// Fused bias + activation + gain + clamp, and its first two derivatives.
//
// With z = x + b and v = gain * act(z), the three orders compute
//   order 0:  clamp(v)
//   order 1:  g1 * gain * act'(z)        where |v| <= clamp (zero where the clamp was active)
//   order 2:  g2 * g1 * gain * act''(z)  with the same mask.
// Order 1 is dL/dz given g1 = dL/dy; order 2 is the derivative of order 1 with respect to z,
// contracted with g2 = the gradient flowing into order 1's result (double backward).
// Every tensor shares one dense memory layout, so the kernel walks storage linearly and recovers
// the bias index from the storage offset: (offset / bias_stride) % bias_size.

#include <cstdint>

#include "dtype_io.cuh"
#include "stylex_ops.h"

namespace stylex {
namespace {

constexpr float kSeluAlpha = 1.6732632423543772848f;
constexpr float kSeluScale = 1.0507009873554804934f;
constexpr float kSoftplusThreshold = 20.0f;  // above it softplus(z) == z in float32

enum Act : int { kLinear = 0, kRelu, kLrelu, kTanh, kSigmoid, kElu, kSelu, kSoftplus, kSwish };

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// The activation's value (always needed for the clamp mask) and its ORDER-th derivative.
template <int ORDER>
__device__ __forceinline__ float activate(int act, float z, float alpha, float& value) {
    const bool pos = z > 0.0f;
    switch (act) {
        case kLinear:
            value = z;
            return ORDER == 0 ? z : (ORDER == 1 ? 1.0f : 0.0f);
        case kRelu:
            value = pos ? z : 0.0f;
            return ORDER == 0 ? value : (ORDER == 1 ? (pos ? 1.0f : 0.0f) : 0.0f);
        case kLrelu:
            value = pos ? z : alpha * z;
            return ORDER == 0 ? value : (ORDER == 1 ? (pos ? 1.0f : alpha) : 0.0f);
        case kTanh: {
            const float t = tanhf(z);
            const float d1 = 1.0f - t * t;
            value = t;
            return ORDER == 0 ? t : (ORDER == 1 ? d1 : -2.0f * t * d1);
        }
        case kSigmoid: {
            const float s = sigmoid(z);
            const float d1 = s * (1.0f - s);
            value = s;
            return ORDER == 0 ? s : (ORDER == 1 ? d1 : d1 * (1.0f - 2.0f * s));
        }
        case kElu: {
            value = pos ? z : expm1f(z);
            if (ORDER == 0) return value;
            const float e = pos ? 0.0f : expf(z);
            return ORDER == 1 ? (pos ? 1.0f : e) : e;
        }
        case kSelu: {
            value = kSeluScale * (pos ? z : kSeluAlpha * expm1f(z));
            if (ORDER == 0) return value;
            const float e = pos ? 0.0f : kSeluScale * kSeluAlpha * expf(z);
            return ORDER == 1 ? (pos ? kSeluScale : e) : e;
        }
        case kSoftplus: {
            const bool linear = z > kSoftplusThreshold;
            value = linear ? z : log1pf(expf(z));
            if (ORDER == 0) return value;
            const float s = sigmoid(z);
            return ORDER == 1 ? (linear ? 1.0f : s) : (linear ? 0.0f : s * (1.0f - s));
        }
        case kSwish: {
            const float s = sigmoid(z);
            value = z * s;
            if (ORDER == 0) return value;
            return ORDER == 1 ? s * (1.0f + z * (1.0f - s)) : s * (1.0f - s) * (2.0f + z * (1.0f - 2.0f * s));
        }
        default:
            value = 0.0f;
            return 0.0f;
    }
}

template <typename T, typename Index, int ORDER>
__global__ void bias_act_kernel(BiasActParams p) {
    const T* x = static_cast<const T*>(p.x);
    const T* b = static_cast<const T*>(p.b);
    const T* g1 = static_cast<const T*>(p.g1);
    const T* g2 = static_cast<const T*>(p.g2);
    T* out = static_cast<T*>(p.out);
    const Index n = static_cast<Index>(p.numel);
    const Index bias_stride = static_cast<Index>(p.bias_stride);
    const Index bias_size = static_cast<Index>(p.bias_size);
    const Index step = static_cast<Index>(blockDim.x) * gridDim.x;

    for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
        float z = Io<T>::load(x + i);
        if (b != nullptr) {
            Index j;
            if constexpr (sizeof(Index) == 4) {
                const uint32_t q = fast_div(i, p.div_stride);
                j = fast_mod(q, fast_div(q, p.div_size), p.div_size);
            } else {
                j = (i / bias_stride) % bias_size;
            }
            z += Io<T>::load(b + j);
        }
        float value;
        const float d = activate<ORDER>(p.act, z, p.alpha, value);
        const float v = value * p.gain;
        float r;
        if (ORDER == 0) {
            // Written with comparisons rather than fminf/fmaxf so that NaN propagates.
            r = p.clamp < 0.0f ? v : (v < -p.clamp ? -p.clamp : (v > p.clamp ? p.clamp : v));
        } else {
            const bool inside = p.clamp < 0.0f || fabsf(v) <= p.clamp;
            r = inside ? d * p.gain * Io<T>::load(g1 + i) : 0.0f;
            if (ORDER == 2) r *= Io<T>::load(g2 + i);
        }
        Io<T>::store(out + i, r);
    }
}

template <typename T, typename Index>
void launch_typed(const BiasActParams& p, cudaStream_t stream) {
    constexpr int kThreads = 256;
    constexpr int64_t kItemsPerThread = 4;  // grid-stride iterations; amortises index set-up
    const int64_t blocks64 = (p.numel + kThreads * kItemsPerThread - 1) / (kThreads * kItemsPerThread);
    const unsigned blocks = static_cast<unsigned>(blocks64 < 1 ? 1 : (blocks64 > 0x7fffffff ? 0x7fffffff : blocks64));
    switch (p.order) {
        case 0: STYLEX_LAUNCH(blocks, kThreads, stream, bias_act_kernel<T, Index, 0>)(p); break;
        case 1: STYLEX_LAUNCH(blocks, kThreads, stream, bias_act_kernel<T, Index, 1>)(p); break;
        default: STYLEX_LAUNCH(blocks, kThreads, stream, bias_act_kernel<T, Index, 2>)(p); break;
    }
}

template <typename T>
void launch_index(const BiasActParams& p, cudaStream_t stream) {
    // 32-bit index arithmetic is several times cheaper than 64-bit division; the bound leaves
    // room for i + step to stay below 2^32.
    if (p.numel < (int64_t(1) << 31)) {
        launch_typed<T, uint32_t>(p, stream);
    } else {
        launch_typed<T, int64_t>(p, stream);
    }
}

}  // namespace

void launch_bias_act(const BiasActParams& p, DType dtype, cudaStream_t stream) {
    if (p.numel == 0) return;
    switch (dtype) {
        case DType::Float32: launch_index<float>(p, stream); break;
        case DType::Float16: launch_index<__half>(p, stream); break;
        case DType::BFloat16: launch_index<__nv_bfloat16>(p, stream); break;
    }
}

}  // namespace stylex
