"""How fast the generator's synthesis network and the encoder learn to reconstruct, alone.

    python benchmarks/reconstruction_bench.py                      # pixel L1 only, 600 steps
    python benchmarks/reconstruction_bench.py --rec-lap 8          # plus the Laplacian-pyramid L1
    python benchmarks/reconstruction_bench.py --steps 1200 --lr 0.003 --beta1-g 0.9 --grid recon.png
    python benchmarks/reconstruction_bench.py --encoder-noise     # noise maps from the image (NoiseMapEncoder)

StylEx's encoder path is an autoencoder: ``x -> E(x) -> G.synthesis -> x̂``. Before a run can
explain what a classifier uses, this autoencoder has to draw those things; if it cannot within the
training budget, neither adversarial nor classifier terms will make it. This benchmark trains a
fresh generator and encoder of the ``cpu32`` preset's size (or ``--model``) on reconstruction
alone (no discriminator, no classifier, one fixed class vector) on the synthetic fundus scenes,
and measures what the reconstructions of held-out scenes carry, read by the factor probe that
``explain_quality.py`` uses:

- pixel L1 of the reconstructions;
- for each factor the probe reads (optic disc position, exudate and haemorrhage counts, ...), the
  share of its variance across the held-out scenes that the reconstructions keep (R^2 of the
  probe's reading of x̂ against its reading of x; 1 = kept, <= 0 = lost), and the correlation of
  the two readings (the probe reads blurred images with a bias, which R^2 counts and r does not).

A factor with R^2 near 0 is one the encoder path does not draw yet, whatever its L1 says.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision.utils as vutils  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from stylex.data.synthetic import generate_split  # noqa: E402
from stylex.metrics.probe import cached_factor_probe  # noqa: E402
from stylex.networks.encoder import Encoder, NoiseMapEncoder  # noqa: E402
from stylex.networks.generator import Generator  # noqa: E402
from stylex.training import losses  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def scenes(num: int, split: str, resolution: int, lesion_scale: float) -> torch.Tensor:
    data = generate_split(num, 0, split, resolution, lesion_scale=lesion_scale)
    return torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cpu32", help="model preset under configs/model (its sizes are used)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--lr", type=float, default=None,
                    help="generator and encoder learning rate (default: the preset's)")
    ap.add_argument("--beta1-g", type=float, default=0.0, help="the generator's Adam beta1 (training uses 0)")
    ap.add_argument("--rec-l1", type=float, default=1.0)
    ap.add_argument("--rec-lap", type=float, default=0.0, help="weight of the Laplacian-pyramid L1 (loss.rec_lap)")
    ap.add_argument("--lesion-scale", type=float, default=1.6, help="dataset.lesion_scale (the quickstart's 1.6)")
    ap.add_argument("--num-train", type=int, default=4096)
    ap.add_argument("--num-eval", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encoder-noise", action="store_true",
                    help="render with noise maps computed from the image (NoiseMapEncoder) instead of noise")
    ap.add_argument("--grid", type=Path, default=None, help="write held-out scenes over their reconstructions here")
    args = ap.parse_args(argv)

    preset = CONFIGS / "model" / f"{args.model}.yaml"
    if not preset.is_file():
        known = ", ".join(sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
        raise SystemExit(f"--model {args.model}: no preset {preset}; known: {known}")
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    m = OmegaConf.load(preset)
    res, bs = int(m.resolution), int(args.batch_size or m.batch_size)
    lr = float(args.lr or m.lr)
    torch.manual_seed(args.seed)
    train, held_out = (scenes(args.num_train, "train", res, args.lesion_scale),
                       scenes(args.num_eval, "val", res, args.lesion_scale))
    # With encoder noise the noise strengths start at 1: at StyleGAN2's 0 no gradient reaches the maps.
    G = Generator(z_dim=m.z_dim, w_dim=m.w_dim, c_dim=2, mapping_layers=m.mapping_layers, resolution=res,
                  channel_base=m.channel_base, channel_max=m.channel_max,
                  noise_init=1.0 if args.encoder_noise else 0.0)
    E = Encoder(res, m.w_dim, channel_base=m.channel_base, channel_max=m.channel_max,
                latent=m.get("encoder_latent", "w"), num_ws=G.num_ws)
    N = NoiseMapEncoder(G.noise_layers) if args.encoder_noise else None
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(args.beta1_g, 0.99))
    opt_e = torch.optim.Adam(list(E.parameters()) + (list(N.parameters()) if N else []), lr=lr, betas=(0.9, 0.99))

    def render(x: torch.Tensor, c: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        return G.generate(E(x), c, noise_mode=noise_mode, noise=None if N is None else N(x))

    c = torch.nn.functional.one_hot(torch.zeros(bs, dtype=torch.long), 2).float()  # one class vector throughout
    print(f"{args.model}: {res}x{res}, batch {bs}, lr {lr}, G beta1 {args.beta1_g}, "
          f"loss {args.rec_l1} x L1 + {args.rec_lap} x Laplacian L1, {args.steps} steps"
          + (", noise maps from the image" if N is not None else ""))
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = train[torch.randint(0, train.shape[0], (bs,), generator=gen)]
        x_rec = render(x, c)
        l1 = losses.l1(x_rec, x)
        loss = args.rec_l1 * l1 + (args.rec_lap * losses.laplacian_l1(x_rec, x) if args.rec_lap > 0 else 0.0)
        opt_g.zero_grad(set_to_none=True)
        opt_e.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        opt_e.step()
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            print(f"step {step:5d}  train L1 {l1.item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start

    with torch.no_grad():
        ce = torch.nn.functional.one_hot(torch.zeros(held_out.shape[0], dtype=torch.long), 2).float()
        rec = torch.cat([render(held_out[i:i + 64], ce[i:i + 64], noise_mode="const")
                         for i in range(0, held_out.shape[0], 64)]).clamp(-1, 1)
        probe = cached_factor_probe(res, **({"lesion_scale": args.lesion_scale} if args.lesion_scale != 1.0 else {}))
        real_read, rec_read = probe.read(held_out), probe.read(rec)
    print(f"held-out pixel L1 {float(losses.l1(rec, held_out)):.4f} (mean image "
          f"{float(losses.l1(held_out.mean(0, keepdim=True).expand_as(held_out), held_out)):.4f}); "
          f"{seconds / args.steps:.3f} s a step")
    print("factor kept by the reconstructions: R^2 of the probe's reading of x̂ against its reading of x, "
          "and their correlation r")
    for j, name in enumerate(probe.factor_names):
        if probe.r2.get(name, -math.inf) < 0.5:
            continue  # the probe itself cannot read it
        truth = real_read[:, j]
        r2 = 1.0 - float((rec_read[:, j] - truth).square().mean() / truth.var(unbiased=False).clamp_min(1e-12))
        r = float(torch.corrcoef(torch.stack([rec_read[:, j], truth]))[0, 1])
        print(f"  {name:14s} R^2 {r2:6.2f}  r {r:5.2f}")
    if args.grid is not None:
        grid = torch.cat([held_out[:8], rec[:8]])
        vutils.save_image(torch.nn.functional.interpolate(grid, scale_factor=4) * 0.5 + 0.5, args.grid, nrow=8)
        print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
