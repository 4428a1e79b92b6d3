"""How far a recipe's cross-validated figures move from one seed to the next (repeated CV).

Pass the folders of several finished ``leukodetect cv`` runs of one recipe that differ only in
``--seed`` (which changes the folds and the initial weights). Prints each run's accuracy,
sensitivity, specificity and wrong cells, their mean ± sd and range, the cells wrong in every run,
and the runs' out-of-fold probabilities averaged (an honest estimate of an ensemble of one model
per run: every model that scores a cell was trained without it). ``--json F`` also writes it all.

    python scripts/seed_spread.py runs/cv-r50-e50-ls runs/cv-r50-e50-ls-seed1 runs/cv-r50-e50-ls-seed2 --target 0.985
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leukodetect.evaluation.repeats import read_predictions, repeat_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="folders of finished cv runs of one recipe")
    parser.add_argument("--target", type=float, default=None, help="an accuracy to count the runs reaching it, e.g. 0.985")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()

    summary = repeat_summary({str(r): read_predictions(r) for r in args.runs}, target=args.target)
    for name, r in summary["runs"].items():
        print(f"{name}: accuracy {r['accuracy']:.2%}, sensitivity {r['sensitivity']:.2%}, "
              f"specificity {r['specificity']:.2%}, {r['errors']} wrong: {', '.join(r['wrong'])}")
    for key, s in summary["spread"].items():
        fmt = (lambda v: f"{v:.2%}") if key != "errors" else (lambda v: f"{v:.2f}")
        print(f"{key} over {summary['n_runs']} runs: mean {fmt(s['mean'])} ± {fmt(s['sd'])} (sd), "
              f"range {fmt(s['min'])} – {fmt(s['max'])}")
    print(f"wrong in every run: {', '.join(summary['wrong_in_every_run']) or 'none'}")
    if summary["runs_reaching_target"]:
        t = summary["runs_reaching_target"]
        print(f"runs reaching accuracy {t['target']:.2%}: {t['count']} of {summary['n_runs']}")
    avg = summary["mean_of_runs"]
    acc = avg["metrics"]["accuracy"]
    print(f"mean of the runs' out-of-fold P(blast): accuracy {acc['value']:.2%} ({acc['ci_low']:.2%} – {acc['ci_high']:.2%}), "
          f"{len(avg['wrong'])} wrong: {', '.join(avg['wrong'])}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
