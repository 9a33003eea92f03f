"""Fused CUDA ops against the reference at StyleGAN2's shapes.

For each op and resolution (batch 32, StyleGAN2 config-f channel counts: ``min(32768 / r, 512)``)
prints the time and peak memory of the CUDA and reference paths for the forward pass and for
forward + backward, the speed-up, and the CUDA forward's achieved bandwidth as a share of the
device's measured copy bandwidth. Then times a full generator + discriminator training step
(with an R1 penalty, which differentiates twice) under ``ops.impl=cuda`` and ``ops.impl=ref``.

Targets: each fused op >= 2x faster than the reference; bias_act >= 60 % of copy bandwidth on
large tensors; the training step >= 1.2x faster.

    python benchmarks/ops_bench.py [--batch 32] [--resolutions 64 128 256] [--iters 20]
                                   [--dtype float32] [--train-resolution 64] [--no-train-step]

Without a CUDA GPU it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from stylex.ops import bias_act, downsample2d, filter2d, set_default_impl, setup_filter, upsample2d
from stylex.ops import dispatch
from stylex.ops._build import BuildError


@dataclass
class Timing:
    ms: float  # median milliseconds per call
    peak_mib: float  # peak memory allocated during one call, beyond what was allocated before


def measure(fn: Callable[[], object], iters: int, warmup: int = 3) -> Timing:
    """Median CUDA-event time over ``iters`` calls and the peak extra memory of one call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return Timing(statistics.median(times), peak)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write) in GB/s: the ceiling for elementwise ops."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), iters=10)
    return 2 * nbytes / (t.ms * 1e-3) / 1e9


def channels(res: int) -> int:
    return min(32768 // res, 512)


@dataclass
class OpCase:
    name: str
    make_input: Callable[[int], torch.Tensor]  # resolution -> input tensor
    run: Callable[[torch.Tensor, str], torch.Tensor]  # (x, impl) -> output


def op_cases(batch: int, dtype: torch.dtype) -> list[OpCase]:
    f = setup_filter([1, 3, 3, 1], device="cuda")
    bias = {}

    def b_for(c: int) -> torch.Tensor:
        if c not in bias:
            bias[c] = torch.randn(c, device="cuda", dtype=dtype)
        return bias[c]

    def rand(res: int) -> torch.Tensor:
        return torch.randn(batch, channels(res), res, res, device="cuda", dtype=dtype)

    def rand_half(res: int) -> torch.Tensor:
        return torch.randn(batch, channels(res), res // 2, res // 2, device="cuda", dtype=dtype)

    return [
        OpCase(
            "bias_act lrelu+clamp",
            rand,
            lambda x, i: bias_act(x, b_for(x.shape[1]), act="lrelu", clamp=256.0, impl=i),
        ),
        OpCase("upsample2d x2 (k4_up2)", rand_half, lambda x, i: upsample2d(x, f, impl=i)),
        OpCase("downsample2d /2 (k4_down2)", rand, lambda x, i: downsample2d(x, f, impl=i)),
        OpCase("filter2d (k4)", rand, lambda x, i: filter2d(x, f, padding=1, impl=i)),
    ]


def bench_ops(args: argparse.Namespace, copy_gbs: float) -> None:
    dtype = getattr(torch, args.dtype)
    header = (
        f"{'op':28s} {'res':>4s} {'impl':>4s} {'fwd ms':>8s} {'fwd MiB':>8s} {'f+b ms':>8s} {'f+b MiB':>8s}"
        f" {'speed-up f/f+b':>15s} {'GB/s':>7s} {'of copy':>7s}"
    )
    print(header)
    print("-" * len(header))
    for case in op_cases(args.batch, dtype):
        for res in args.resolutions:
            x = case.make_input(res)
            xg = x.detach().requires_grad_()
            with torch.no_grad():
                y = case.run(x, "ref")
            dy = torch.randn_like(y)
            results = {}
            for impl in ("cuda", "ref"):
                fwd = measure(lambda x=x, impl=impl: case.run(x, impl), args.iters)

                def fwd_bwd(impl=impl, xg=xg, dy=dy):
                    out = case.run(xg, impl)
                    out.backward(dy)
                    xg.grad = None

                results[impl] = (fwd, measure(fwd_bwd, args.iters))
            moved = x.numel() * x.element_size() + y.numel() * y.element_size()
            for impl in ("cuda", "ref"):
                fwd, fb = results[impl]
                gbs = moved / (fwd.ms * 1e-3) / 1e9
                if impl == "cuda":
                    speed = f"{results['ref'][0].ms / fwd.ms:6.2f}x/{results['ref'][1].ms / fb.ms:5.2f}x"
                else:
                    speed = ""
                print(
                    f"{case.name:28s} {res:4d} {impl:>4s} {fwd.ms:8.3f} {fwd.peak_mib:8.1f}"
                    f" {fb.ms:8.3f} {fb.peak_mib:8.1f}"
                    f" {speed:>15s} {gbs:7.0f} {100 * gbs / copy_gbs:6.0f}%"
                )
            del x, xg, y, dy
            torch.cuda.empty_cache()


def bench_training_step(args: argparse.Namespace) -> None:
    try:
        from stylex.networks import Discriminator, Generator
    except ImportError as err:
        print(f"\nstylex.networks.Generator / Discriminator not available ({err}): skipping the training step")
        return
    res, batch = args.train_resolution, args.train_batch
    torch.manual_seed(0)
    G = Generator(
        z_dim=512, w_dim=512, c_dim=0, resolution=res, channel_base=32768, channel_max=512, mapping_layers=8
    ).cuda()
    D = Discriminator(resolution=res, c_dim=0, channel_base=32768, channel_max=512).cuda()
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0, 0.99))
    real = torch.randn(batch, 3, res, res, device="cuda")

    def step() -> None:
        # generator: non-saturating loss
        z = torch.randn(batch, 512, device="cuda")
        loss_g = F.softplus(-D(G(z, None), None)).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        # discriminator: logistic loss plus R1 on the reals (a double backward through D)
        with torch.no_grad():
            fake = G(torch.randn(batch, 512, device="cuda"), None)
        x = real.detach().requires_grad_()
        logits_real = D(x, None)
        (grad,) = torch.autograd.grad(logits_real.sum(), x, create_graph=True)
        r1 = grad.square().sum(dim=(1, 2, 3)).mean()
        loss_d = F.softplus(D(fake, None)).mean() + F.softplus(-logits_real).mean() + 5.0 * r1
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

    print(f"\ntraining step (G + D with R1), resolution {res}, batch {batch}")
    times = {}
    for impl in ("cuda", "ref"):
        set_default_impl(impl)
        t = measure(step, args.iters, warmup=3)
        times[impl] = t
        print(f"  ops.impl={impl:4s} {t.ms:9.2f} ms   peak {t.peak_mib:8.1f} MiB")
    set_default_impl("auto")
    print(f"  speed-up {times['ref'].ms / times['cuda'].ms:.2f}x (target >= 1.2x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--train-resolution", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--no-train-step", action="store_true")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("No CUDA GPU is visible: the fused ops run on CUDA only, so there is nothing to benchmark here.")
        return 0
    try:
        dispatch.extension()
    except BuildError as err:
        print(f"The fused CUDA ops could not be built, so there is nothing to compare:\n{err}")
        return 1
    # Same matmul/convolution precision for both paths.
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  batch {args.batch}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"measured device copy bandwidth: {copy_gbs:.0f} GB/s\n")
    bench_ops(args, copy_gbs)
    if not args.no_train_step:
        bench_training_step(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
