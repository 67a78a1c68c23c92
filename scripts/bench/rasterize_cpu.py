"""CPU timing of the pure-torch rasterizer: 3k random Gaussians at 96x96, RGB, forward + backward.

python scripts/bench/rasterize_cpu.py [--n 3000] [--size 96] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gsstudio_ext.core.rasterize import rasterize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    means = torch.randn(args.n, 3, generator=g) * torch.tensor([1.0, 1.0, 0.5]) + torch.tensor([0.0, 0.0, 4.0])
    params = [
        means,
        torch.randn(args.n, 4, generator=g),
        torch.rand(args.n, 3, generator=g) * 0.08 + 0.01,
        torch.rand(args.n, generator=g) * 0.9 + 0.05,
        torch.rand(args.n, 3, generator=g),
    ]
    params = [p.requires_grad_(True) for p in params]
    focal, centre = args.size * 100 / 96, args.size / 2
    K = torch.tensor([[[focal, 0.0, centre], [0.0, focal, centre], [0.0, 0.0, 1.0]]])
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        out, alpha, _ = rasterize(*params, torch.eye(4)[None], K, args.size, args.size, backend="torch")
        (out.sum() + alpha.sum()).backward()
        times.append(time.perf_counter() - start)
    best = min(times[1:])
    print(f"{args.n} Gaussians {args.size}x{args.size} fwd+bwd on CPU: best {best * 1e3:.1f} ms over {args.repeats}")


if __name__ == "__main__":
    main()
