"""How often a new image lies beyond a guard edge set as a percentile of n held-out images (simulated).

Draws n held-out scores and 2,000 new ones from one chi-square distribution, sets the edge at the percentile
of the n (as ``evaluation.ood.guard_threshold`` does) and prints the share of new scores beyond it, averaged
over many draws: what a laboratory with n validation cells should expect of its own new cells.

    python scripts/percentile_tail_probe.py --percentile 98.75 --n 20 37 79 181 236
"""

from __future__ import annotations

import argparse

import numpy as np

from leukodetect.evaluation.ood import guard_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--percentile", type=float, default=98.75)
    parser.add_argument("--n", type=int, nargs="+", default=[20, 37, 79, 181, 236])
    parser.add_argument("--dof", type=int, default=8, help="degrees of freedom of the chi-square scores")
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"edge at the {args.percentile:g}th percentile of n held-out scores; nominal share beyond it {100 - args.percentile:.2f}%")
    for n in args.n:
        beyond = [np.mean(rng.chisquare(args.dof, 2000) > guard_threshold(rng.chisquare(args.dof, n), args.percentile))
                  for _ in range(args.draws)]
        print(f"n = {n:4d}: {100 * np.mean(beyond):.2f}% of new scores beyond the edge (mean of {args.draws} draws)")


if __name__ == "__main__":
    main()
