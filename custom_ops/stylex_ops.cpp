// Python bindings of the fused kernels: argument checks, memory layouts and the choice of kernel.
// The autograd rules live next to each op's reference (stylex/ops/upfirdn2d.py, bias_act.py); these
// functions are plain forward maps.

// Narrow includes keep the compile short: torch/extension.h brings the whole C++ frontend, and
// ATen/cuda/CUDAContext.h brings cuBLAS and cuSPARSE headers, which a minimal toolkit lacks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>
#ifndef STYLEX_HOST_KERNELS
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <optional>
#include <string>

#include "stylex_ops.h"

// Where the kernels run. The host build (STYLEX_HOST_KERNELS, see host_kernels.h) runs the same
// kernels on CPU tensors so that their arithmetic can be tested without a GPU.
#ifdef STYLEX_HOST_KERNELS
#define STYLEX_ON_KERNEL_DEVICE(t) (t).is_cpu()
#define STYLEX_KERNEL_DEVICE "CPU (host build)"
#define STYLEX_DEVICE_GUARD(t)
#define STYLEX_STREAM nullptr
#define STYLEX_LAUNCH_CHECK()
#else
#define STYLEX_ON_KERNEL_DEVICE(t) (t).is_cuda()
#define STYLEX_KERNEL_DEVICE "CUDA"
#define STYLEX_DEVICE_GUARD(t) const c10::cuda::OptionalCUDAGuard guard((t).device())
#define STYLEX_STREAM c10::cuda::getCurrentCUDAStream()
#define STYLEX_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif

namespace {

using stylex::DType;
using stylex::UpfirdnPath;

constexpr int64_t kMaxLaunch = (int64_t(1) << 31) - 1;  // kernels index with 32-bit integers

DType dtype_of(const at::Tensor& t, const char* what) {
    switch (t.scalar_type()) {
        case at::kFloat: return DType::Float32;
        case at::kHalf: return DType::Float16;
        case at::kBFloat16: return DType::BFloat16;
        default: TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
    }
    return DType::Float32;
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* what) {
    TORCH_CHECK(t.device() == x.device(), what, " is on ", t.device(), " but x is on ", x.device());
}

// `t` with x's dtype and memory layout; copied only when either differs.
at::Tensor like(const at::Tensor& t, const at::Tensor& x, const char* what) {
    check_same_device(t, x, what);
    TORCH_CHECK(t.sizes() == x.sizes(), what, " has shape ", t.sizes(), " but x has shape ", x.sizes());
    if (t.scalar_type() == x.scalar_type() && t.strides() == x.strides()) return t;
    return at::empty_like(x).copy_(t);
}

// ---------------------------------------------------------------------------------------------
// bias_act
// ---------------------------------------------------------------------------------------------

at::Tensor bias_act(const at::Tensor& x_in,               // any shape
                    const std::optional<at::Tensor>& b_in, // [x.shape[dim]] or None
                    const std::optional<at::Tensor>& g1_in,  // order >= 1: gradient, x's shape
                    const std::optional<at::Tensor>& g2_in,  // order == 2: gradient, x's shape
                    int64_t order,                           // 0, 1 or 2 (see bias_act.cu)
                    int64_t dim,                             // dimension of x that b runs along
                    int64_t act,                             // activation code
                    double alpha, double gain,
                    double clamp) {                          // < 0: no clamp
    TORCH_CHECK(STYLEX_ON_KERNEL_DEVICE(x_in), "bias_act: x must be a " STYLEX_KERNEL_DEVICE " tensor, got one on ",
                x_in.device());
    const DType dtype = dtype_of(x_in, "bias_act: x");
    TORCH_CHECK(order >= 0 && order <= 2, "bias_act: order must be 0, 1 or 2, got ", order);
    TORCH_CHECK(act >= 0 && act <= 8, "bias_act: unknown activation code ", act);
    STYLEX_DEVICE_GUARD(x_in);

    // Any dense layout (contiguous, channels_last, other permutations) is walked as it lies in
    // memory; anything else (slices, expanded views) is made contiguous first.
    const at::Tensor x = x_in.is_non_overlapping_and_dense() ? x_in : x_in.contiguous();

    stylex::BiasActParams p{};
    p.x = x.data_ptr();
    p.numel = x.numel();
    p.act = static_cast<int>(act);
    p.order = static_cast<int>(order);
    p.alpha = static_cast<float>(alpha);
    p.gain = static_cast<float>(gain);
    p.clamp = static_cast<float>(clamp);
    p.bias_stride = 1;
    p.bias_size = 1;

    at::Tensor b, g1, g2;
    if (b_in.has_value()) {
        const int64_t nd = x.dim();
        TORCH_CHECK(nd > 0 && dim >= -nd && dim < nd, "bias_act: dim ", dim, " is out of range for x with shape ",
                    x.sizes());
        if (dim < 0) dim += nd;
        check_same_device(*b_in, x, "bias_act: b");
        TORCH_CHECK(b_in->dim() == 1 && b_in->size(0) == x.size(dim), "bias_act: bias of shape ", b_in->sizes(),
                    " does not fit dimension ", dim, " of x with shape ", x.sizes());
        b = b_in->to(x.scalar_type()).contiguous();
        p.b = b.data_ptr();
        p.bias_size = x.size(dim);
        // A length-1 dimension may carry any stride; its index is always 0.
        p.bias_stride = p.bias_size == 1 ? 1 : x.stride(dim);
    }
    if (order >= 1) {
        TORCH_CHECK(g1_in.has_value(), "bias_act: order ", order, " needs the incoming gradient g1");
        g1 = like(*g1_in, x, "bias_act: g1");
        p.g1 = g1.data_ptr();
    }
    if (order == 2) {
        TORCH_CHECK(g2_in.has_value(), "bias_act: order 2 needs the second incoming gradient g2");
        g2 = like(*g2_in, x, "bias_act: g2");
        p.g2 = g2.data_ptr();
    }

    // Clamped into FastDiv's range; the 64-bit path (numel >= 2^31) divides directly instead.
    p.div_stride = stylex::make_fast_div(static_cast<uint32_t>(std::clamp<int64_t>(p.bias_stride, 1, kMaxLaunch)));
    p.div_size = stylex::make_fast_div(static_cast<uint32_t>(std::clamp<int64_t>(p.bias_size, 1, kMaxLaunch)));

    at::Tensor out = at::empty_like(x);  // same strides as the dense x
    p.out = out.data_ptr();
    stylex::launch_bias_act(p, dtype, STYLEX_STREAM);
    STYLEX_LAUNCH_CHECK();
    return out;
}

// ---------------------------------------------------------------------------------------------
// upfirdn2d
// ---------------------------------------------------------------------------------------------

struct Pass {
    int upx, upy, downx, downy;
    int px0, px1, py0, py1;
    int fw, fh;
    bool separable;
    float gain;
};

int out_size(int in, int up, int pad0, int pad1, int taps, int down, const char* axis) {
    const int span = in * up + pad0 + pad1 - taps;
    TORCH_CHECK(span >= 0, "upfirdn2d: the output would be empty along ", axis, " (input ", in, ", up ", up,
                ", padding ", pad0, "/", pad1, ", ", taps, " taps)");
    return span / down + 1;
}

// One kernel launch (split along the batch when the output exceeds 32-bit indexing).
at::Tensor run_pass(const at::Tensor& x,      // [n, c, h, w]
                    const at::Tensor& f,      // float32, contiguous: [fh, fw], or [fw] == [fh] taps
                    bool flip_taps,           // convolve rather than correlate
                    const Pass& s,
                    at::ScalarType out_type,
                    bool channels_last,
                    UpfirdnPath path) {
    const int n = static_cast<int>(x.size(0)), c = static_cast<int>(x.size(1));
    const int in_h = static_cast<int>(x.size(2)), in_w = static_cast<int>(x.size(3));
    const int out_w = out_size(in_w, s.upx, s.px0, s.px1, s.fw, s.downx, "x");
    const int out_h = out_size(in_h, s.upy, s.py0, s.py1, s.fh, s.downy, "y");
    const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    at::Tensor y = at::empty({n, c, out_h, out_w}, x.options().dtype(out_type).memory_format(format));
    if (y.numel() == 0) return y;

    stylex::UpfirdnParams p{};
    p.f = f.data_ptr<float>();
    p.fy = p.f;  // a separable filter uses the same taps along both axes
    p.flip_taps = flip_taps;
    p.c = c;
    p.in_h = in_h;
    p.in_w = in_w;
    p.out_h = out_h;
    p.out_w = out_w;
    p.sx_n = x.stride(0), p.sx_c = x.stride(1), p.sx_h = x.stride(2), p.sx_w = x.stride(3);
    p.sy_n = y.stride(0), p.sy_c = y.stride(1), p.sy_h = y.stride(2), p.sy_w = y.stride(3);
    p.upx = s.upx, p.upy = s.upy, p.downx = s.downx, p.downy = s.downy;
    p.px0 = s.px0, p.py0 = s.py0;
    p.fw = s.fw, p.fh = s.fh;
    p.separable = s.separable;
    p.channels_last = channels_last;
    p.gain = s.gain;
    p.div_c = stylex::make_fast_div(static_cast<uint32_t>(c));
    p.div_w = stylex::make_fast_div(static_cast<uint32_t>(out_w));
    p.div_h = stylex::make_fast_div(static_cast<uint32_t>(out_h));

    const int64_t per_sample = int64_t(c) * out_h * out_w;
    TORCH_CHECK(per_sample <= kMaxLaunch, "upfirdn2d: one sample of the output has ", per_sample,
                " elements, more than the kernels' 32-bit indexing allows; use impl='ref'");
    const int chunk = static_cast<int>(std::min<int64_t>(n, kMaxLaunch / per_sample));
    const DType in_dtype = dtype_of(x, "upfirdn2d: x");
    const DType out_dtype = dtype_of(y, "upfirdn2d: output");
    const auto stream = STYLEX_STREAM;
    for (int n0 = 0; n0 < n; n0 += chunk) {
        p.n = std::min(chunk, n - n0);
        p.x = static_cast<const char*>(x.data_ptr()) + int64_t(n0) * x.stride(0) * x.element_size();
        p.y = static_cast<char*>(y.data_ptr()) + int64_t(n0) * y.stride(0) * y.element_size();
        stylex::launch_upfirdn2d(p, path, in_dtype, out_dtype, stream);
        STYLEX_LAUNCH_CHECK();
    }
    return y;
}

const char* path_name(UpfirdnPath path) {
    switch (path) {
        case UpfirdnPath::K4: return "k4";
        case UpfirdnPath::K4Up2: return "k4_up2";
        case UpfirdnPath::K4Down2: return "k4_down2";
        default: return "generic";
    }
}

std::string upfirdn2d_path(int64_t fw, int64_t fh, int64_t upx, int64_t upy, int64_t downx, int64_t downy) {
    return path_name(stylex::choose_upfirdn_path(static_cast<int>(fw), static_cast<int>(fh), static_cast<int>(upx),
                                                 static_cast<int>(upy), static_cast<int>(downx),
                                                 static_cast<int>(downy)));
}

at::Tensor upfirdn2d(const at::Tensor& x,  // [batch, channels, height, width]
                     const at::Tensor& f,  // [taps] (separable) or [taps_y, taps_x]
                     int64_t upx, int64_t upy, int64_t downx, int64_t downy,
                     int64_t px0, int64_t px1, int64_t py0, int64_t py1,
                     bool flip_filter,     // true: correlate rather than convolve
                     double gain,
                     bool force_generic) { // skip the specialised kernels (tests)
    TORCH_CHECK(STYLEX_ON_KERNEL_DEVICE(x), "upfirdn2d: x must be a " STYLEX_KERNEL_DEVICE " tensor, got one on ",
                x.device());
    TORCH_CHECK(x.dim() == 4, "upfirdn2d: x must have shape [N, C, H, W], got ", x.sizes());
    dtype_of(x, "upfirdn2d: x");
    TORCH_CHECK(f.dim() == 1 || f.dim() == 2, "upfirdn2d: the filter must be 1-D or 2-D, got shape ", f.sizes());
    TORCH_CHECK(f.numel() > 0, "upfirdn2d: the filter is empty");
    TORCH_CHECK(upx >= 1 && upy >= 1 && downx >= 1 && downy >= 1, "upfirdn2d: factors must be >= 1");
    TORCH_CHECK(x.size(2) * upy <= kMaxLaunch && x.size(3) * upx <= kMaxLaunch, "upfirdn2d: image too large");
    STYLEX_DEVICE_GUARD(x);

    // No copy for the usual float32 filter on x's device; the kernels flip by indexing.
    const at::Tensor fc = f.to(x.device(), at::kFloat).contiguous();
    const bool flip_taps = !flip_filter;  // upfirdn2d convolves unless asked to correlate

    const bool separable = fc.dim() == 1;
    const int fw = static_cast<int>(separable ? fc.size(0) : fc.size(1));
    const int fh = static_cast<int>(fc.size(0));  // 1-D: the same taps along y
    // Size-1 channel or spatial dims make both formats "contiguous"; then plain NCHW order wins.
    const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);

    const UpfirdnPath path = force_generic ? UpfirdnPath::Generic
                                           : stylex::choose_upfirdn_path(fw, fh, static_cast<int>(upx),
                                                                         static_cast<int>(upy),
                                                                         static_cast<int>(downx),
                                                                         static_cast<int>(downy));
    Pass s{static_cast<int>(upx), static_cast<int>(upy), static_cast<int>(downx), static_cast<int>(downy),
           static_cast<int>(px0), static_cast<int>(px1), static_cast<int>(py0), static_cast<int>(py1),
           fw, fh, false, static_cast<float>(gain)};

    if (path != UpfirdnPath::Generic) {
        s.separable = separable;
        return run_pass(x, fc, flip_taps, s, x.scalar_type(), channels_last, path);
    }
    if (!separable) return run_pass(x, fc, flip_taps, s, x.scalar_type(), channels_last, path);

    // Generic separable filter: a pass along x (taps as a [1, K] filter) and one along y ([K, 1]),
    // in the order with the smaller intermediate, kept in float32.
    Pass along_x{s.upx, 1, s.downx, 1, s.px0, s.px1, 0, 0, fw, 1, false, 1.0f};
    Pass along_y{1, s.upy, 1, s.downy, 0, 0, s.py0, s.py1, 1, fh, false, 1.0f};
    const int64_t in_h = x.size(2), in_w = x.size(3);
    const int64_t out_w = out_size(static_cast<int>(in_w), s.upx, s.px0, s.px1, fw, s.downx, "x");
    const int64_t out_h = out_size(static_cast<int>(in_h), s.upy, s.py0, s.py1, fh, s.downy, "y");
    const bool x_first = in_h * out_w <= out_h * in_w;
    Pass& first = x_first ? along_x : along_y;
    Pass& second = x_first ? along_y : along_x;
    second.gain = s.gain;
    const at::Tensor mid = run_pass(x, fc, flip_taps, first, at::kFloat, channels_last, path);
    return run_pass(mid, fc, flip_taps, second, x.scalar_type(), channels_last, path);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "Fused CUDA kernels of stylex.ops (bias_act, upfirdn2d)";
    m.def("bias_act", &bias_act, "y = clamp(act(x + b) * gain) or its first/second derivative", py::arg("x"),
          py::arg("b"), py::arg("g1"), py::arg("g2"), py::arg("order"), py::arg("dim"), py::arg("act"),
          py::arg("alpha"), py::arg("gain"), py::arg("clamp"));
    m.def("upfirdn2d", &upfirdn2d, "upsample, pad, FIR-filter, downsample, scale", py::arg("x"), py::arg("f"),
          py::arg("upx"), py::arg("upy"), py::arg("downx"), py::arg("downy"), py::arg("px0"), py::arg("px1"),
          py::arg("py0"), py::arg("py1"), py::arg("flip_filter"), py::arg("gain"), py::arg("force_generic"));
    m.def("upfirdn2d_path", &upfirdn2d_path, "name of the kernel that a configuration takes", py::arg("fw"),
          py::arg("fh"), py::arg("upx"), py::arg("upy"), py::arg("downx"), py::arg("downy"));
}
