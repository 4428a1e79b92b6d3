"""A new laboratory labels a few of its own cells: how far does fine-tuning on them bring the model back?

The leave-one-laboratory-out runs show that a model trained on four laboratories calls almost no blast of
a fifth one a blast (docs/results.md). A laboratory that adopts the tool can label some of its own cells
and fine-tune (``leukodetect train --weights MODEL --data mylab=...``). This script measures what that
buys, with the model trained without the laboratory (``cross-lab``'s ``without_LAB/best.pt``) standing in
for the shipped model meeting a new laboratory:

- draw ``k`` blasts and ``k`` normal cells of the laboratory (whole groups: a patient for C-NMC, a source
  photograph for ALL-IDB2 when ``--allidb2`` and ``--allidb1`` are given), seeded;
- fine-tune the model on them alone (no other laboratory's cells: a laboratory does not have them),
  ``train``'s recipe with ``--weights``, the last epoch kept;
- score it on every other cell of the laboratory (none shares a group with the ones it was tuned on),
  beside the untouched model on the same cells, and beside the untouched model whose batch-norm statistics
  were re-estimated on the laboratory's cells without their labels (AdaBN, Li et al. 2016: no labelling
  at all, only the laboratory's images).

Usage (PYTHONPATH=src where leukodetect is not installed)::

    python scripts/site_adaptation.py --bank runs/bank3/cells.csv --lab allidb \
        --base runs/xlab/lolo/without_allidb/best.pt --out runs/adapt/allidb --per-class 5,20 --seeds 0,1 \
        --allidb2 ../shared/datasets/ALL-IDB2 --allidb1 ../shared/datasets/ALL-IDB1

It writes ``OUT/k{K}_seed{S}/`` (a ``train`` run) per draw, ``OUT/adaptation.json`` and ``OUT/table.md``;
a draw whose run finished is not trained again.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from leukodetect.config import RunConfig
from leukodetect.evaluation.intervals import binary_report
from leukodetect.jobs.cells import bank_summary
from leukodetect.jobs.train import run_train
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.scale import CanonicalScale
from leukodetect.utils import environment_facts, write_json

METRICS = ("sensitivity", "specificity", "roc_auc")
MODELS = {"base": "as trained without {lab}", "adabn": "batch-norm statistics of {lab}'s cells, no labels",
          "adapted": "fine-tuned on the k labelled cells"}


def bank_cells(bank: Path, lab: str) -> list[dict]:
    """The laboratory's rows of the bank, with absolute paths."""
    with bank.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["lab"] == lab]
    if not rows:
        sys.exit(f"{bank} holds no cell of laboratory {lab!r}.")
    return [{**r, "path": str((bank.parent / r["path"]).resolve()), "label": int(r["label"])} for r in rows]


def photograph_groups(cells: list[dict], allidb2: Path, allidb1: Path) -> None:
    """Replace each ALL-IDB2 crop's group by its source photograph in ALL-IDB1 (crops of one photograph together)."""
    from leukodetect.data.indexers import index_dataset
    from leukodetect.data.sources import source_groups

    records = index_dataset(allidb2, "allidb2")
    by_stem = dict(zip((r.path.stem for r in records), source_groups(records, allidb1, progress=False)))
    for cell in cells:
        cell["group"] = by_stem.get(Path(cell["path"]).stem, cell["group"])


def draw(cells: list[dict], k: int, seed: int) -> tuple[list[dict], list[dict]]:
    """At least ``k`` cells of each label, as whole groups drawn at random; the other cells are the test part."""
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label in (0, 1):
        groups = sorted({c["group"] for c in cells if c["label"] == label} - chosen)
        taken = 0
        for g in rng.permutation(groups):
            if taken >= k:
                break
            chosen.add(str(g))
            taken += sum(c["group"] == g and c["label"] == label for c in cells)
    tune = [c for c in cells if c["group"] in chosen]
    return tune, [c for c in cells if c["group"] not in chosen]


def validation_part(tune: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Whole groups of the tuning cells, drawn at random until they hold ``share`` of them, set apart to choose the epoch and
    set the guard's threshold (``train --val-fraction --guard``); (training part, validation part). At least one group
    stays in each."""
    groups = sorted({c["group"] for c in tune})
    chosen: set[str] = set()
    for g in np.random.default_rng(seed).permutation(groups)[: max(0, len(groups) - 1)]:
        if sum(c["group"] in chosen for c in tune) >= share * len(tune):
            break
        chosen.add(str(g))
    return [c for c in tune if c["group"] not in chosen], [c for c in tune if c["group"] in chosen]


def adapt_batch_norm(clf: Classifier, paths: list[str], rbc_diameter: float, *, batch_size: int = 32) -> None:
    """Re-estimate every batch norm's running statistics on these images (their labels unused), in place."""
    import torch

    from leukodetect.runtime.images import open_rgb

    for module in clf.model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over every batch
    views = [clf.view(open_rgb(p), rbc_diameter=rbc_diameter)[0] for p in paths]
    clf.model.train()
    with torch.no_grad():
        for batch in clf.preprocessed_batches(views, batch_size):
            clf.model(clf.model_input(batch))
    clf.model.eval()


def config(args, bank: Path, lab: str, split_file: Path) -> RunConfig:
    cfg = RunConfig()
    cfg.data.path, cfg.data.format, cfg.data.image_size, cfg.data.labs = str(bank), "manifest", args.image_size, [lab]
    cfg.data.split_file, cfg.data.val_fraction, cfg.data.num_workers = str(split_file), 0.0, args.workers
    cfg.model.arch, cfg.model.weights = args.arch, str(args.base)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = args.epochs, args.batch_size, args.lr
    cfg.train.checkpoint_every = args.epochs
    cfg.augment.rotation, cfg.augment.colour, cfg.augment.hed, cfg.augment.blur, cfg.augment.jpeg = 180.0, 0.2, 0.05, 0.3, 0.3
    cfg.train.balance = args.balance
    if args.guard:
        cfg.data.val_fraction, cfg.train.guard = args.guard, True
    cfg.validate()
    return cfg


def figures(cells: list[dict], prob: dict[str, float]) -> dict:
    report = binary_report(np.array([c["label"] for c in cells]), np.array([prob[c["path"]] for c in cells]), threshold=0.5)
    return {name: report["metrics"][name] for name in METRICS} | {"n": len(cells)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=Path, required=True, help="The cell bank (cells.csv) the base model was trained from.")
    parser.add_argument("--lab", required=True, help="The laboratory the base model never saw.")
    parser.add_argument("--base", type=Path, required=True, help="The model trained without it (cross-lab's without_LAB/best.pt).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", default="5,20", help="k: cells of each label to fine-tune on, comma-separated.")
    parser.add_argument("--seeds", default="0,1", help="Draws of the k cells, comma-separated seeds.")
    parser.add_argument("--allidb2", type=Path, help="ALL-IDB2, to group its crops by source photograph (with --allidb1).")
    parser.add_argument("--allidb1", type=Path)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--guard", type=float, default=0.0, metavar="SHARE",
                        help="set this share of the tuning cells apart (whole groups) to choose the epoch and fit a guard")
    parser.add_argument("--balance", default="none", help="train's --balance: none, or labs (with one laboratory: both classes "
                        "drawn alike, where a laboratory's photographs hold more blasts than normal cells)")
    args = parser.parse_args(argv)

    bank = args.bank.resolve()
    cells = bank_cells(bank, args.lab)
    grouping = "the bank's groups"
    if args.allidb2 and args.allidb1:
        photograph_groups(cells, args.allidb2, args.allidb1)
        grouping = "ALL-IDB2 crops grouped by their source photograph in ALL-IDB1"
    args.out.mkdir(parents=True, exist_ok=True)
    base = Classifier.from_checkpoint(args.base, backend="torch")
    scale = CanonicalScale.from_dict(bank_summary(bank)["scale"])
    base_prob = dict(zip((c["path"] for c in cells),
                         (p.prob_blast for p in base.predict_paths([c["path"] for c in cells], rbc_diameter=scale.pixels_per_rbc))))
    adabn = Classifier.from_checkpoint(args.base, backend="torch")
    adapt_batch_norm(adabn, [c["path"] for c in cells], scale.pixels_per_rbc)
    adabn_prob = dict(zip((c["path"] for c in cells),
                          (p.prob_blast for p in adabn.predict_paths([c["path"] for c in cells], rbc_diameter=scale.pixels_per_rbc))))
    runs = []
    for k in (int(v) for v in args.per_class.split(",")):
        for seed in (int(v) for v in args.seeds.split(",")):
            tune, test = draw(cells, k, seed)
            run_dir = args.out / f"k{k}_seed{seed}"
            metrics_file = run_dir / "test" / "metrics.json"
            if not metrics_file.is_file():
                run_dir.mkdir(parents=True, exist_ok=True)
                split = run_dir.parent / f"k{k}_seed{seed}.split.json"
                fit, val = validation_part(tune, args.guard, seed) if args.guard else (tune, [])
                write_json(split, {"train": [c["path"] for c in fit], "val": [c["path"] for c in val], "test": [c["path"] for c in test]})
                t0 = time.perf_counter()
                run_train(config(args, bank, args.lab, split), run_dir, progress=False, command=" ".join(sys.argv), log=print)
                print(f"k={k} seed={seed}: fine-tuned in {time.perf_counter() - t0:.0f} s", flush=True)
            with (run_dir / "test" / "predictions.csv").open(newline="") as fh:
                tuned_prob = {str(Path(r["path"]).resolve()): float(r["prob_blast"]) for r in csv.DictReader(fh)}
            runs.append({"k": k, "seed": seed, "tuned_on": {"blast": sum(c["label"] for c in tune), "normal": sum(1 - c["label"] for c in tune)},
                         "base": figures(test, base_prob), "adabn": figures(test, adabn_prob), "adapted": figures(test, tuned_prob)})
    result = {"lab": args.lab, "base": str(args.base), "grouping": grouping, "epochs": args.epochs, "lr": args.lr, "balance": args.balance, "guard": args.guard,
              "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(), "runs": runs,
              "versions": environment_facts()}
    write_json(args.out / "adaptation.json", result)
    lines = [f"Fine-tuning on k labelled cells per class of {args.lab} ({grouping}); scored on the rest, threshold 0.5.", "",
             "| k per class | seed | tuned on (blast / normal) | test cells | model | sensitivity (95% CI) | specificity (95% CI) | ROC AUC (95% CI) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for name in ("base", "adabn", "adapted"):
            f = r[name]
            cols = [f"{f[m]['value']:.1%} ({f[m]['ci_low']:.1%}-{f[m]['ci_high']:.1%})" if m != "roc_auc"
                    else f"{f[m]['value']:.3f} ({f[m]['ci_low']:.3f}-{f[m]['ci_high']:.3f})" for m in METRICS]
            lines.append(f"| {r['k']} | {r['seed']} | {r['tuned_on']['blast']} / {r['tuned_on']['normal']} | {f['n']} | "
                         f"{MODELS[name].format(lab=args.lab)} | " + " | ".join(cols) + " |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
