"""The ``leukodetect`` command: thin commands that parse, build a config, call a job, print.

Each command imports its job when it runs, not at the top of this module: importing every job
(PyTorch, scikit-learn, scikit-image, FastAPI...) takes 5.8 s on two cores, against 0.14 s for
``leukodetect --help`` (measured 2026-12-04). This is the one module allowed to import the
project's own modules inside functions (tests/test_layers.py holds the rule).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console, Group
from rich.table import Table

from leukodetect.errors import LeukoError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Detect acute lymphoblastic leukemia in blood-smear images.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect data sets.")
app.add_typer(data_app, name="data")


class _StdoutFailed(Exception):
    """Standard output could not take the results: a closed pipe, a full disk behind a redirection."""

    def __init__(self, cause: OSError):
        super().__init__(cause.strerror or str(cause))


class _ResultConsole(Console):
    def on_broken_pipe(self) -> None:
        # rich's default leaves silently with status 1; a closed pipe is told like a full disk.
        raise _StdoutFailed(BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)))


out = _ResultConsole()
err = Console(stderr=True, soft_wrap=True)


def _errors_to_exit(fn):
    """Print a user error as one sentence and exit 2, instead of a traceback.

    User errors are :class:`LeukoError`, and outputs that cannot be written (see :func:`_output_error`):
    a read-only or full disk, a file where a folder is needed, a closed standard output.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            finally:
                _flush_stdout()  # here, not at exit, where a failure is a traceback and status 120
        except LeukoError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
        except _StdoutFailed as exc:
            _discard_stdout()
            err.print(f"[bold red]error:[/] Standard output could not take the results ({exc}), so what it shows is incomplete: "
                      "write them to a file on a disk with room, or to a program that reads them to the end.", highlight=False)
            raise typer.Exit(2) from None
        except OSError as exc:
            sentence = _output_error(exc, kwargs.get("out_dir") or kwargs.get("out_file"))
            if sentence is None:
                raise
            err.print(f"[bold red]error:[/] {sentence}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("Interrupted: the last finished epoch is saved; rerun with --resume to continue.")
            raise typer.Exit(130) from None

    return wrapper


def _output_error(exc: OSError, out: Path | str | None) -> str | None:
    """One sentence for a file or folder that could not be written, naming it; None for other OS errors.

    Args:
        out: the command's --out, named where the error does not say which file (a write that filled the disk).
    """
    name = exc.filename or out
    hint = "choose another --out" if out is not None else "choose another place"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"No space left on the disk (or the quota is used up) while writing {name or 'the outputs'}: free some space or {hint} on another disk."
    if name is None:
        return None
    if exc.errno == errno.EROFS:
        return f"{name} is on a read-only file system: {hint} on a writable disk."
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{name} cannot be written (permission denied): {hint}, or change its permissions."
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        target = Path(out or name)
        blocker = next((p for p in target.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            return f"{target} cannot be made: {blocker} is a file, not a folder; {hint} or move the file away."
        if exc.errno == errno.ENOTDIR:
            return f"{name} cannot be made: a part of it is a file, not a folder; {hint}."
        return f"{name} already exists: {hint} or move it away."
    if exc.errno == errno.EISDIR:
        return f"{name} is a folder where a file is needed: name a file, or move the folder away."
    return None


def _check_output_folder(folder: Path, option: str = "--out", *, file: Path | None = None) -> None:
    """Before any work: refuse a folder that cannot be made or written in, in one sentence naming it.

    Nothing is created here; the command makes the folder when it first writes.

    Args:
        file: the output file the folder is to hold, when the option names a file.
    """
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        if existing == folder and file is None:
            raise LeukoError(f"{folder} is a file, where {option} needs a folder: choose another {option} or move the file away.")
        raise LeukoError(f"{file or folder} cannot be made: {existing} is a file, not a folder; choose another {option} "
                         "or move the file away.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LeukoError(f"{existing} cannot be written (permission denied, or a read-only disk): choose another {option}, "
                         "or change its permissions.")


@contextlib.contextmanager
def _writing_results():
    """Results printed on standard output: a write it refuses (a closed pipe, a full disk) is :class:`_StdoutFailed`."""
    try:
        yield
    except OSError as exc:
        raise _StdoutFailed(exc) from exc


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except OSError as exc:
        raise _StdoutFailed(exc) from exc


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that the results it could not take are not tried again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's captured output): nothing is left to flush at exit
        pass


def _command_line() -> str:
    return "leukodetect " + shlex.join(sys.argv[1:])


def _progress() -> bool:
    return sys.stderr.isatty()


def _log(message: str) -> None:
    err.print(message, highlight=False)


# Options of train, cv and compare. Each names a RunConfig field (see _run_config); None keeps the value
# of --config's YAML, or RunConfig's default.
DataOpt = typer.Option(..., "--data", help="Data folder or CSV manifest.")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON.")
SourcesOpt = typer.Option(..., "--data", help="Data folder or CSV manifest (a cell bank's cells.csv too); or, repeated, one "
                          "laboratory each as LAB=PATH[:FORMAT][@PIXELS] (PIXELS: its red-cell diameter, where none can be measured).")
FieldOpt = typer.Option(None, "--field", help="Red-cell diameters across the model's input: every cell is shown at one physical "
                        "scale (default: 3 with several laboratories; 0, images as they are, otherwise).")
LabsOpt = typer.Option(None, "--labs", help="Comma-separated laboratories to keep from a cell bank (default: all).")
RotationOpt = typer.Option(None, "--rotation", help="Training rotation range in degrees (default 20, the paper's; cells have no up: 180).")
ColourOpt = typer.Option(None, "--colour", help="Brightness, contrast and saturation jitter, e.g. 0.2 (default 0, off).")
HedOpt = typer.Option(None, "--hed", help="Stain jitter in haematoxylin-eosin space, e.g. 0.05 (default 0, off).")
BlurOpt = typer.Option(None, "--blur", help="Probability of a Gaussian blur of each training image, e.g. 0.3 (default 0).")
JpegOpt = typer.Option(None, "--jpeg", help="Probability of JPEG compression (quality 50-95) of each training image (default 0).")
LowresOpt = typer.Option(None, "--lowres", help="Probability of a resolution drop (down 1.5-4x and back) of each training image: "
                         "fewer pixels per cell, as another camera or magnification gives (default 0).")
BalanceOpt = typer.Option(None, "--balance", help="none (default), or labs: draw so both classes weigh the same and each "
                          "laboratory, within its class, by the square root of its size.")
GuardOpt = typer.Option(None, "--guard/--no-guard", help="Fit the out-of-distribution guard after training (needs --val-fraction above 0).")
ArchOpt = typer.Option(None, "--arch", help="Architecture (see 'leukodetect models'); default resnet50.")
EpochsOpt = typer.Option(None, "--epochs", help="Epochs (paper: 100).")
ImageSizeOpt = typer.Option(None, "--image-size", help="Square input size in pixels (default 224).")
BatchSizeOpt = typer.Option(None, "--batch-size")
LrOpt = typer.Option(None, "--lr", help="Peak learning rate (cosine schedule).")
OptimizerOpt = typer.Option(None, "--optimizer", help="adamw or sgd.")
LabelSmoothingOpt = typer.Option(None, "--label-smoothing")
EmaOpt = typer.Option(None, "--ema", help="Decay of an exponential moving average of the weights, updated every step "
                      "(e.g. 0.98; default 0, off); the average is what is validated and saved.")
MixupOpt = typer.Option(None, "--mixup", help="MixUp on each training batch with this Beta parameter (e.g. 0.2; default 0, off).")
CutmixOpt = typer.Option(None, "--cutmix", help="CutMix on each training batch with this Beta parameter (e.g. 1.0; default 0, off); "
                         "with --mixup too, each batch gets one of the two.")
MixstyleOpt = typer.Option(None, "--mixstyle", help="MixStyle: the probability (e.g. 0.5; default 0, off), per batch and per stage, "
                           "of mixing the channel statistics of the first three ResNet stages between the batch's images "
                           "(style from other laboratories). Training only; the saved network is the usual one.")
ValFractionOpt = typer.Option(None, "--val-fraction", help="Share of the training images held out to choose the epoch by "
                              "validation loss (default 0.15); 0: none, every training image trains and the last epoch is kept.")
SelectOpt = typer.Option(None, "--select", help="Which epoch is kept: best (lowest validation loss, the default) or last "
                         "(the validation part still scored, and used by --guard's threshold).")
CheckpointEveryOpt = typer.Option(None, "--checkpoint-every", help="Write last.pt, the resume point, every N epochs "
                                  "(default 1; more on a GPU, where saving can take longer than an epoch).")
WeightsOpt = typer.Option(None, "--weights", help="None (from scratch, default), 'imagenet' or a weights file.")
ProtocolOpt = typer.Option(None, "--protocol", help="clean (split first, default) or paper (augment to 2470, then split).")
GroupByOpt = typer.Option(None, "--group-by", help="default, or source: ALL-IDB2 crops of one ALL-IDB1 photograph stay together.")
AllIdb1Opt = typer.Option(None, "--allidb1", help="ALL-IDB1 folder for --group-by source (default: found beside --data).")
FormatOpt = typer.Option(None, "--format", help="allidb2, allidb1, cnmc, folders or manifest (default: detected).")
SeedOpt = typer.Option(None, "--seed")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.")
PrecisionOpt = typer.Option(None, "--precision", help="auto, fp32, bf16 or fp16.")
WorkersOpt = typer.Option(None, "--workers", help="DataLoader worker processes per training job (augmentation).")
ConfigOpt = typer.Option(None, "--config", help="YAML with defaults: a run's config.yaml works, or e.g. data: {paper_total: 2470}.")
DevicesOpt = typer.Option(
    "auto", "--devices",
    help="Train folds at the same time, one worker process per device: auto (every GPU when there are two or more, "
         "not under torchrun), off, or a list such as cuda:0,cuda:1 (cpu,cpu also works; naming a GPU twice "
         "runs two jobs on it at once).",
)
# Options of detect-eval and train-detector, which train the same recipe (see _detector_config). The defaults are
# the shipped detector's recipe, DetectEvalConfig's defaults (a test holds the two equal).
DetEpochsOpt = typer.Option(30, "--epochs", help="Crop classifier epochs.")
DetImageSizeOpt = typer.Option(96, "--image-size", help="Crop classifier input size; crops are cut at this size.")
DetArchOpt = typer.Option("googlenet", "--arch", help="Crop classifier architecture (see 'leukodetect models').")
DetBatchSizeOpt = typer.Option(32, "--batch-size")
CropFactorOpt = typer.Option(2.0, "--crop-factor", min=1.0, help="Crop side in red-cell diameters, measured on each photograph.")
SmudgeGateTrainOpt = typer.Option(True, "--smudge-gate/--no-smudge-gate",
                                  help="Also train the smudge-cell gate and store it with the classifier.")
GateKeepOpt = typer.Option(0.99, "--gate-keep", help="Share of the annotated training cells the smudge gate keeps.")
CellScorerTrainOpt = typer.Option(True, "--cell-scorer/--no-cell-scorer",
                                  help="Also train the cell scorer (region measurements combined with the crop classifier).")
PhotoContextOpt = typer.Option(False, "--photo-context/--no-photo-context",
                               help="The cell scorer also weighs the photograph's white-cell density (white cells per red-cell area); "
                               "off by default: on ALL-IDB1 it called two sparse ALL photographs healthy (docs/detection.md).")
DetValFractionOpt = typer.Option(0.0, "--val-fraction", min=0.0, max=0.9, help="Share of the training photographs held out to choose "
                                 "the crop classifier's epoch; 0: none, every training photograph trains and the last epoch is kept.")
DetLabelSmoothingOpt = typer.Option(0.0, "--label-smoothing", min=0.0, max=0.5, help="Label smoothing of the crop classifier's loss.")
# Options of the commands that load a classifier.
LocatorOpt = typer.Option("learned", "--locator", help="How white cells are found: learned (the default: a network trained on ALL-IDB1"
                          ", BCCD and PBC, at the red-cell scale measured first, whose cells the five-laboratory cell model classifies) or colour "
                          "(purple thresholds tuned on ALL-IDB1, with the ALL-IDB1 detector, its smudge gate and cell scorer: ALL-IDB1's own "
                          "pipeline, wrong on most other laboratories' smears; see docs/detection.md).")
LocatorWeightsOpt = typer.Option(None, "--locator-weights", help="A locator from train-locator (default: the shipped one).")
BatchScaleOpt = typer.Option(False, "--batch-scale", help="Measure every photograph's red cells first and analyse all at their "
                             "median (isolated red cells' readings): for photographs of one microscope and camera whose pixel "
                             "size is not known (per laboratory in smear-eval). Learned locator only.")
SmearPixelSizeOpt = typer.Option(None, "--pixel-size", min=0.001, help="Micrometres per pixel of the smear photographs, if the "
                                 "laboratory knows its camera's (default: measured on each photograph's red cells; learned locator only).")
ReviewLowOpt = typer.Option(None, "--review-low", help="P(blast) below this is normal (default 0.3 with the model's threshold at 0.5; a "
                            "calibrated threshold moves it, as 'calibrate' chose).")
ReviewHighOpt = typer.Option(None, "--review-high", help="P(blast) at or above this is a blast; in between, review (default 0.7 with the "
                             "model's threshold at 0.5; a calibrated threshold moves it).")
EdgeMarginOpt = typer.Option(0.5, "--edge-margin", min=0.0, help="A cell centred within this many red-cell diameters of the "
                             "photograph's frame is cut by it: a blast call on it becomes review (0: off).")
BackendOpt = typer.Option("auto", "--backend", help="What runs the network: auto (ONNX Runtime on CPU, exported once per "
                          "checkpoint and cached; PyTorch on GPU), torch or onnx. Both agree within 1e-4 in P(blast).")
StainReferenceOpt = typer.Option(None, "--stain-reference", help="An image, or a folder (8 images evenly spaced over its sorted files "
                                 "are used), of the model's training data: the stain to normalise toward.")

#: The RunConfig fields the options of train, cv and compare may set, by section.
_RUN_CONFIG_FIELDS = {
    "data": ("path", "sources", "format", "image_size", "split_file", "protocol", "num_workers", "val_fraction", "group_by", "allidb1",
             "field_diameters", "labs"),
    "augment": ("rotation", "colour", "hed", "blur", "jpeg", "lowres"),
    "model": ("arch", "weights"),
    "train": ("epochs", "batch_size", "lr", "optimizer", "seed", "device", "precision", "label_smoothing", "ema", "mixup",
              "cutmix", "mixstyle", "checkpoint_every", "balance", "guard", "select"),
}
#: Command parameters named otherwise than the RunConfig field they set.
_RUN_CONFIG_NAMES = {"fmt": "format", "workers": "num_workers", "field": "field_diameters"}


def _run_config(options: dict):
    """The RunConfig of a train, cv or compare command line: --config's YAML (or the defaults), then each option given.

    Args:
        options: the command's ``locals()``. A parameter named like a RunConfig field (or mapped to one in
            _RUN_CONFIG_NAMES) sets it unless it is None; the others (--out, --resume, --folds...) are the command's own.
    """
    from leukodetect.config import RunConfig, load_config

    cfg = load_config(options["config"]) if options.get("config") else RunConfig()
    values = {_RUN_CONFIG_NAMES.get(name, name): value for name, value in options.items()}
    data = values.pop("data", None) or []
    if len(data) == 1 and "=" not in data[0]:
        values["path"] = data[0]
    elif data:
        values["sources"] = list(data)  # several laboratories, each LAB=PATH (checked when the run starts)
    if isinstance(values.get("labs"), str):
        values["labs"] = [lab.strip() for lab in values["labs"].split(",") if lab.strip()]
    for section, keys in _RUN_CONFIG_FIELDS.items():
        for key in keys:
            value = values.get(key)
            if value is not None:
                setattr(getattr(cfg, section), key, str(value) if isinstance(value, Path) else value)
    cfg.validate()
    return cfg


def _detector_config(options: dict):
    """The DetectEvalConfig of a detect-eval or train-detector command line (its ``locals()``); absent fields keep their defaults."""
    from leukodetect.detection.crops import CropConfig
    from leukodetect.jobs.detect_eval import DetectEvalConfig

    names = {f.name for f in fields(DetectEvalConfig)} - {"crop"}
    return DetectEvalConfig(crop=CropConfig(crop_factor=options["crop_factor"]), **{k: v for k, v in options.items() if k in names})


@app.command()
@_errors_to_exit
def train(
    data: list[str] = SourcesOpt,
    out_dir: Path = typer.Option(..., "--out", help="Run folder (must not hold a run unless --resume)."),
    arch: Optional[str] = ArchOpt,
    epochs: Optional[int] = EpochsOpt,
    image_size: Optional[int] = ImageSizeOpt,
    batch_size: Optional[int] = BatchSizeOpt,
    lr: Optional[float] = LrOpt,
    optimizer: Optional[str] = OptimizerOpt,
    label_smoothing: Optional[float] = LabelSmoothingOpt,
    ema: Optional[float] = EmaOpt,
    mixup: Optional[float] = MixupOpt,
    cutmix: Optional[float] = CutmixOpt,
    mixstyle: Optional[float] = MixstyleOpt,
    val_fraction: Optional[float] = ValFractionOpt,
    select: Optional[str] = SelectOpt,
    checkpoint_every: Optional[int] = CheckpointEveryOpt,
    weights: Optional[str] = WeightsOpt,
    protocol: Optional[str] = ProtocolOpt,
    group_by: Optional[str] = GroupByOpt,
    allidb1: Optional[Path] = AllIdb1Opt,
    split_file: Optional[Path] = typer.Option(None, help="A split.json fixing train/val/test."),
    fmt: Optional[str] = FormatOpt,
    field: Optional[float] = FieldOpt,
    labs: Optional[str] = LabsOpt,
    rotation: Optional[float] = RotationOpt,
    colour: Optional[float] = ColourOpt,
    hed: Optional[float] = HedOpt,
    blur: Optional[float] = BlurOpt,
    jpeg: Optional[float] = JpegOpt,
    lowres: Optional[float] = LowresOpt,
    balance: Optional[str] = BalanceOpt,
    guard: Optional[bool] = GuardOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    precision: Optional[str] = PrecisionOpt,
    workers: Optional[int] = WorkersOpt,
    config: Optional[Path] = ConfigOpt,
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
    as_json: bool = JsonOpt,
):
    """Train on a stratified, group- and duplicate-aware split and score the held-out test part."""
    from leukodetect.jobs.train import run_train

    cfg = _run_config(locals())
    _check_output_folder(out_dir)
    result = run_train(cfg, out_dir, resume=resume, progress=_progress(), command=_command_line(), log=_log)
    _print_result(result, as_json, result["test"], f"Test split of {out_dir}")


@app.command()
@_errors_to_exit
def cv(
    data: list[str] = SourcesOpt,
    out_dir: Path = typer.Option(..., "--out", help="Output folder (one subfolder per fold)."),
    folds: int = typer.Option(5, help="Number of folds."),
    arch: Optional[str] = ArchOpt,
    epochs: Optional[int] = EpochsOpt,
    image_size: Optional[int] = ImageSizeOpt,
    batch_size: Optional[int] = BatchSizeOpt,
    lr: Optional[float] = LrOpt,
    optimizer: Optional[str] = OptimizerOpt,
    label_smoothing: Optional[float] = LabelSmoothingOpt,
    ema: Optional[float] = EmaOpt,
    mixup: Optional[float] = MixupOpt,
    cutmix: Optional[float] = CutmixOpt,
    mixstyle: Optional[float] = MixstyleOpt,
    val_fraction: Optional[float] = ValFractionOpt,
    select: Optional[str] = SelectOpt,
    checkpoint_every: Optional[int] = CheckpointEveryOpt,
    weights: Optional[str] = WeightsOpt,
    protocol: Optional[str] = ProtocolOpt,
    group_by: Optional[str] = GroupByOpt,
    allidb1: Optional[Path] = AllIdb1Opt,
    fmt: Optional[str] = FormatOpt,
    field: Optional[float] = FieldOpt,
    labs: Optional[str] = LabsOpt,
    rotation: Optional[float] = RotationOpt,
    colour: Optional[float] = ColourOpt,
    hed: Optional[float] = HedOpt,
    blur: Optional[float] = BlurOpt,
    jpeg: Optional[float] = JpegOpt,
    lowres: Optional[float] = LowresOpt,
    balance: Optional[str] = BalanceOpt,
    guard: Optional[bool] = GuardOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    precision: Optional[str] = PrecisionOpt,
    workers: Optional[int] = WorkersOpt,
    devices: str = DevicesOpt,
    config: Optional[Path] = ConfigOpt,
    resume: bool = typer.Option(False, help="Keep finished folds and continue."),
    as_json: bool = JsonOpt,
):
    """Stratified group k-fold cross-validation: every image predicted once, out of fold."""
    from leukodetect.jobs.train import run_cv

    cfg = _run_config(locals())
    _check_output_folder(out_dir)
    result = run_cv(cfg, out_dir, folds=folds, resume=resume, progress=_progress(), command=_command_line(), devices=devices, log=_log)
    _print_result(result, as_json, result["pooled"], f"{folds}-fold CV, pooled out-of-fold ({out_dir})", result["folds"])


@app.command()
@_errors_to_exit
def cells(
    data: list[str] = typer.Option(..., "--data", help="One laboratory each, repeated: LAB=PATH[:FORMAT][@PIXELS]."),
    out_dir: Path = typer.Option(..., "--out", help="Folder of the cell bank (cells.csv, cells.json, cells/); reused if it holds the same bank."),
    field: float = typer.Option(3.0, "--field", min=1.0, help="Red-cell diameters across each crop."),
    image_size: int = typer.Option(128, "--image-size", min=16, help="Crop side in pixels (the model's input size)."),
    max_per_field: int = typer.Option(0, "--max-per-field", min=0, help="At most this many located cells of each smear field "
                                      "(Aria, BCCD), drawn at random with a fixed seed; 0: all."),
    jpeg_quality: int = typer.Option(0, "--jpeg-quality", min=0, max=100, help="Write the crops as JPEG of this quality "
                                     "(a quarter of the size); 0: PNG, lossless (default)."),
):
    """Cut the single cells of several laboratories at one physical scale into a cell bank (train, cv and cross-lab read it)."""
    from leukodetect.jobs.cells import LabSource, build_bank
    from leukodetect.runtime.scale import CanonicalScale

    _check_output_folder(out_dir)
    manifest = build_bank([LabSource.parse(s) for s in data], out_dir, CanonicalScale(field=field, size=image_size),
                          max_per_field=max_per_field, jpeg_quality=jpeg_quality, progress=_progress(), log=_log)
    out.print(f"Cell bank: {manifest} (use it as --data {manifest}).", highlight=False)


@app.command("cross-lab")
@_errors_to_exit
def cross_lab(
    data: list[str] = SourcesOpt,
    out_dir: Path = typer.Option(..., "--out", help="Output folder (one subfolder per held-out laboratory)."),
    hold_out: Optional[str] = typer.Option(None, "--hold-out", help="Comma-separated laboratories to leave out in turn (default: each)."),
    only: Optional[str] = typer.Option("allidb", "--only", help="Also train on this laboratory alone and score every other one ('' for none)."),
    arch: Optional[str] = ArchOpt,
    epochs: Optional[int] = EpochsOpt,
    image_size: Optional[int] = ImageSizeOpt,
    batch_size: Optional[int] = BatchSizeOpt,
    lr: Optional[float] = LrOpt,
    label_smoothing: Optional[float] = LabelSmoothingOpt,
    val_fraction: Optional[float] = ValFractionOpt,
    select: Optional[str] = SelectOpt,
    checkpoint_every: Optional[int] = CheckpointEveryOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    precision: Optional[str] = PrecisionOpt,
    workers: Optional[int] = WorkersOpt,
    field: Optional[float] = FieldOpt,
    labs: Optional[str] = LabsOpt,
    rotation: Optional[float] = RotationOpt,
    colour: Optional[float] = ColourOpt,
    hed: Optional[float] = HedOpt,
    blur: Optional[float] = BlurOpt,
    jpeg: Optional[float] = JpegOpt,
    lowres: Optional[float] = LowresOpt,
    balance: Optional[str] = BalanceOpt,
    mixstyle: Optional[float] = MixstyleOpt,
    devices: str = DevicesOpt,
    config: Optional[Path] = ConfigOpt,
    resume: bool = typer.Option(False, help="Keep finished runs and continue."),
    as_json: bool = JsonOpt,
):
    """Leave one laboratory out at a time: train on the others, score it, per laboratory with 95% intervals and the guard's flag rate."""
    from leukodetect.jobs.cross_lab import run_cross_lab

    cfg = _run_config({**locals(), "guard": True})
    _check_output_folder(out_dir)
    table = run_cross_lab(cfg, out_dir, hold_out=[s.strip() for s in (hold_out or "").split(",") if s.strip()], only=only or None,
                          resume=resume, progress=_progress(), devices=devices, command=_command_line(), log=_log)
    if as_json:
        _print_json(table)
    else:
        out.print((out_dir / "report.md").read_text(), highlight=False)


@app.command()
@_errors_to_exit
def evaluate(
    checkpoint: Path = typer.Option(..., help="A best.pt from train or cv (or a shipped .safetensors)."),
    data: list[str] = SourcesOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: beside the checkpoint)."),
    fmt: Optional[str] = FormatOpt,
    include_training: bool = typer.Option(False, help="Also score images the model was trained on (inflated)."),
    backend: str = BackendOpt,
    stain_normalize: str = typer.Option("none", help="none, or macenko: re-render every image in the stain of --stain-reference."),
    stain_reference: Optional[Path] = StainReferenceOpt,
    as_json: bool = JsonOpt,
):
    """Metrics with 95% intervals, ROC, confusion matrix and training curves for a checkpoint; per laboratory where the data names them."""
    from leukodetect.data.stain import stain_from_options
    from leukodetect.jobs.cells import LabSource
    from leukodetect.jobs.evaluate import evaluate_checkpoint
    from leukodetect.utils import fresh_dir

    stain = stain_from_options(stain_normalize, stain_reference)
    single = len(data) == 1 and "=" not in data[0]
    sources = [] if single else [LabSource.parse(d) for d in data]
    name = Path(data[0]).name if single else "-".join(s.lab for s in sources)
    target = fresh_dir(out_dir or Path(checkpoint).parent / f"eval-{name}")
    report = evaluate_checkpoint(checkpoint, Path(data[0]) if single else None, target, sources=sources, fmt=fmt or "auto",
                                 include_training=include_training, backend=backend, command=_command_line(), progress=_progress(),
                                 stain=stain, log=_log)
    _print_result({"out_dir": str(target), "metrics": report}, as_json, report, f"Evaluation written to {target}")


@app.command()
@_errors_to_exit
def predict(
    images: list[Path] = typer.Argument(..., help="Images or folders of images (folders are searched recursively)."),
    checkpoint: Optional[Path] = typer.Option(None, help="A best.pt from train or cv (default: the shipped ResNet-50)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Instead of --checkpoint: a .onnx or TorchScript file from 'leukodetect export'."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines on stdout."),
    as_csv: bool = typer.Option(False, "--csv", help="CSV on stdout."),
    batch_size: int = typer.Option(16),
    backend: str = BackendOpt,
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", min=0.001, help="Micrometres per pixel of the images, for a "
                                               "model with a physical scale (default: measured on each image's red cells)."),
):
    """Blast probability and call per image ("review" where the image is unlike the model's training images);
    unreadable files are reported and skipped."""
    from leukodetect.runtime.images import image_paths_of
    from leukodetect.runtime.scale import diameter_from_pixel_size

    if checkpoint is not None and model is not None:
        raise LeukoError("Pass either --checkpoint (a best.pt) or --model (a file from 'leukodetect export'), not both.")
    paths = image_paths_of(images)
    clf = _classifier(checkpoint, model, backend)
    rbc = diameter_from_pixel_size(pixel_size) if pixel_size else None
    preds = clf.predict_paths(paths, batch_size=batch_size, progress=_progress(), rbc_diameter=rbc)
    _print_predictions(preds, clf.threshold, as_json=as_json, as_csv=as_csv)
    if all(p.error for p in preds):
        raise typer.Exit(1)


def _classifier(checkpoint: Optional[Path], model: Optional[Path], backend: str):
    """What predict runs: an exported model (--model), or a checkpoint (default: the shipped ResNet-50)."""
    if model is not None:
        from leukodetect.runtime.export import ExportedClassifier

        return ExportedClassifier.from_file(model)
    from leukodetect.runtime.classifier import Classifier
    from leukodetect.weights import resolve_checkpoint

    return Classifier.from_checkpoint(resolve_checkpoint(checkpoint), backend=backend, log=_log)


def _print_predictions(preds: list, threshold: float, *, as_json: bool, as_csv: bool) -> None:
    """Predictions as JSON lines, CSV or a table on stdout; skipped files and conversion notes on stderr."""
    with _writing_results():
        if as_json:
            for p in preds:
                print(json.dumps(p.to_dict()))
        elif as_csv:
            import csv

            writer = csv.writer(sys.stdout)
            writer.writerow(["path", "label", "prob_blast", "error", "ood_score", "reason"])  # the guard's columns last: older readers keep theirs
            for p in preds:
                writer.writerow([p.path, p.label or "", "" if p.prob_blast is None else f"{p.prob_blast:.6f}", p.error or "",
                                 "" if p.ood_score is None else f"{p.ood_score:.2f}", p.reason or ""])
        else:
            table = Table("image", "call", "P(blast)", title=f"threshold {threshold:.2f}")
            for p in preds:
                call = p.label or "[red]error[/]"
                if p.reason:
                    call = f"[yellow]review[/]: {p.reason} (score {p.ood_score:.0f})"
                table.add_row(p.path, call, f"{p.prob_blast:.4f}" if p.prob_blast is not None else p.error)
            out.print(table)
        sys.stdout.flush()
    for p in preds:
        if p.error:
            err.print(f"skipped: {p.error}", highlight=False)
        for note in p.notes:
            err.print(f"note: {note}", highlight=False)
    read = [p for p in preds if not p.error]
    unlike = sum(p.reason is not None for p in read)
    if (hint := unlike_training_hint(unlike, len(read), f"{unlike} of {len(read)} images are")) is not None:
        err.print(f"note: {hint}", highlight=False)


#: Share of the images read beyond the guard above which predict says what to do (the guard flags about 2% of
#: new cells of the model's own laboratories).
MANY_UNLIKE = 0.25


def unlike_training_hint(unlike: int, total: int, subject: str) -> str | None:
    """One sentence when ``unlike`` of ``total`` inputs are beyond the model's guard, many of them: what it means, what to do.

    ``subject`` begins the sentence ("5 of 6 images are"); nothing is said for fewer than two, or under
    :data:`MANY_UNLIKE` of them.
    """
    if unlike < 2 or unlike < MANY_UNLIKE * total:
        return None
    return (f"{subject} unlike the images this model was trained on. If they are blood cells of your own laboratory, "
            "the model has not been shown to work there: score it on some of your labelled cells (leukodetect "
            "evaluate) and fine-tune it on them (README, 'Your own laboratory'); if they are not blood cells, this "
            "model cannot judge them.")


@app.command()
@_errors_to_exit
def augment(
    src: Path = typer.Argument(..., help="Data folder or manifest to expand."),
    dest: Path = typer.Argument(..., help="New output folder (must not exist or be empty)."),
    total: int = typer.Option(2470, help="Images in the balanced result (half per class)."),
    seed: int = typer.Option(0),
    fmt: Optional[str] = FormatOpt,
):
    """The paper's offline expansion to a balanced set; every file records its source image."""
    from leukodetect.config import AugmentConfig
    from leukodetect.data.augment import expand_dataset
    from leukodetect.data.indexers import index_dataset

    records = index_dataset(src, fmt or "auto")
    written = expand_dataset(records, dest, total=total, augment=AugmentConfig(), seed=seed, progress=_progress(), log=_log)
    out.print(f"Wrote {len(written)} images and {dest / 'manifest.csv'} (path,label,group,source).")


@app.command()
@_errors_to_exit
def explain(
    image: Path = typer.Argument(..., help="A cell image."),
    checkpoint: Optional[Path] = typer.Option(None, help="A best.pt from train or cv (default: the shipped ResNet-50)."),
    out_file: Optional[str] = typer.Option(None, "--out", help="A folder (one that exists, or a path ending in /), which receives "
                                           "IMAGE_gradcam.png (-2, -3... if taken); or the PNG file itself, which must not exist. "
                                           "Default: IMAGE_gradcam.png beside the image."),
    target_class: int = typer.Option(1, help="Class whose evidence is shown: 1 = blast, 0 = normal."),
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", min=0.001, help="Micrometres per pixel of the image, for a "
                                               "model with a physical scale (default: measured on its red cells)."),
    as_json: bool = JsonOpt,
):
    """Grad-CAM overlay: the regions of the image that drove the model's score, on the image as predict shows it."""
    from leukodetect.jobs.explain import explain_file, overlay_folder
    from leukodetect.runtime.scale import diameter_from_pixel_size
    from leukodetect.weights import resolve_checkpoint

    folder = overlay_folder(image, out_file)
    _check_output_folder(folder or Path(out_file).parent, file=None if folder else Path(out_file))
    rbc = diameter_from_pixel_size(pixel_size) if pixel_size else None
    result = explain_file(resolve_checkpoint(checkpoint), image, out_file, target_class=target_class, rbc_diameter=rbc)
    if as_json:
        print(json.dumps(result))
    else:
        for note in result["notes"]:
            _log(note)
        call = f"review: {result['reason']} (score {result['ood_score']:.1f})" if result["reason"] else result["label"]
        out.print(f"{image}: {call} (P(blast) {result['prob_blast']:.4f}); overlay written to {result['out']}", highlight=False)


@app.command()
@_errors_to_exit
def calibrate(
    checkpoint: Optional[Path] = typer.Option(None, help="The checkpoint to calibrate, left unchanged (default: the shipped ResNet-50)."),
    data: Path = typer.Option(..., "--data", help="Labelled validation images (folder, CSV manifest or cell bank), not training images."),
    out_file: Path = typer.Option(..., "--out", help="The calibrated checkpoint to write (must not exist)."),
    target_sensitivity: float = typer.Option(0.99, help="Fraction of validation blasts (with --per smear: of ALL smears) the "
                                             "threshold must find."),
    per: str = typer.Option("cell", "--per", help="cell: the threshold finds that share of blast cells; smear: of ALL smears, each "
                            "scored by its most blast-like cell, as detect calls a smear (a cell bank cut from your labelled smears "
                            "with 'leukodetect cells', whose cells carry their smear's label)."),
    split_file: Optional[Path] = typer.Option(None, help="Use only the 'val' part of this run's split.json."),
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", min=0.001, help="Micrometres per pixel of the images, for a "
                                               "model with a physical scale (default: measured on each image's red cells)."),
    fmt: Optional[str] = FormatOpt,
    as_json: bool = JsonOpt,
):
    """Fit a temperature and a threshold for a target sensitivity; write them into a new checkpoint.

    Each image is shown to the model as predict shows it (its physical scale), so a laboratory can set the threshold on its own cells."""
    from leukodetect.data.indexers import index_dataset
    from leukodetect.jobs.calibrate import calibrate_checkpoint, select_split
    from leukodetect.jobs.cells import is_bank
    from leukodetect.runtime.scale import diameter_from_pixel_size
    from leukodetect.weights import resolve_checkpoint

    records = index_dataset(data, fmt or "auto")
    if split_file:
        records = select_split(records, split_file, "val")
    rbc = diameter_from_pixel_size(pixel_size) if pixel_size else None
    result = calibrate_checkpoint(resolve_checkpoint(checkpoint), records, out_file, target_sensitivity=target_sensitivity,
                                  rbc_diameter=rbc, bank=is_bank(data), per=per, log=_log)
    c = result["calibration"]
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        unit = f"per smear: {c['n_smears']} smears of {c['n_val']} cells" if c["per"] == "smear" else f"n={c['n_val']}"
        out.print(f"Wrote {result['out']}: temperature {result['temperature']:.3f}, threshold {result['threshold']:.4f} "
                  f"(validation sensitivity {c['sensitivity']:.3f}, specificity {c['specificity']:.3f}, {unit}); "
                  f"ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}"
                  + (f"; {c['guard_flagged']} of them beyond the guard (review)." if c.get("guard_flagged") else "."),
                  highlight=False)


@app.command()
@_errors_to_exit
def guard(
    checkpoint: Path = typer.Argument(..., help="A model trained with --guard (e.g. the shipped file); left unchanged."),
    data: Path = typer.Option(..., "--data", help="The cell bank (cells.csv) the model was trained on."),
    out_file: Path = typer.Option(..., "--out", help="The checkpoint to write, with the refitted guard (must not exist)."),
    test_file: Optional[Path] = typer.Option(None, "--test", help="Also write the test part's figures by laboratory here (JSON)."),
    as_json: bool = JsonOpt,
):
    """Fit a model's out-of-distribution guard again on the split it was trained on, without retraining."""
    from leukodetect.jobs.train import refit_guard
    from leukodetect.utils import write_json

    if test_file is not None and test_file.exists():
        raise typer.BadParameter(f"{test_file} exists: choose another --test file.")
    result = refit_guard(checkpoint, data, out_file, log=_log)
    if test_file is not None:
        write_json(test_file, result["test"])
    if as_json:
        print(json.dumps(result, indent=2))
        return
    flagged = ", ".join(f"{lab} {parts['cells']['flag_rate']:.1%}" for lab, parts in result["test"].items())
    b, a = result["before"], result["after"]
    out.print(f"Wrote {result['out']}: guard thresholds features {b['feature_threshold']:.1f} -> {a['feature_threshold']:.1f}, "
              f"pixels {b['pixel_threshold']:.1f} -> {a['pixel_threshold']:.1f}; test part flagged: {flagged or 'no laboratories named'}.",
              highlight=False)


@app.command()
@_errors_to_exit
def export(
    checkpoint: Optional[Path] = typer.Option(None, help="A best.pt from train, cv or calibrate (default: the shipped ResNet-50)."),
    fmt: str = typer.Option(..., "--format", help="onnx or torchscript."),
    out_file: Path = typer.Option(..., "--out", help="File to write (must not exist)."),
    opset: int = typer.Option(18, help="ONNX opset version (18 or newer)."),
    atol: float = typer.Option(1e-4, help="Largest allowed difference in P(blast) from PyTorch."),
    as_json: bool = JsonOpt,
):
    """Export to ONNX or TorchScript with the preprocessing stored inside; reload and check it against PyTorch."""
    from leukodetect.runtime.export import export_model
    from leukodetect.weights import resolve_checkpoint

    result = export_model(resolve_checkpoint(checkpoint), out_file, fmt=fmt, opset=opset, atol=atol)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        out.print(f"Wrote {result['path']} ({fmt}); reloaded, it differs from PyTorch by at most {result['max_abs_diff']:.1e} "
                  f"in P(blast) (tolerance {atol:.0e}). Run it with: leukodetect predict IMAGES --model {result['path']}", highlight=False)


@app.command()
@_errors_to_exit
def compare(
    data: list[str] = SourcesOpt,
    out_dir: Path = typer.Option(..., "--out", help="Comparison folder (rerun the same command to continue it)."),
    archs: str = typer.Option("resnet50,googlenet,resnet101,resnet152,vgg16,vgg19", help="Comma-separated architectures."),
    protocols: str = typer.Option("clean", "--protocol", help="clean, paper or both."),
    folds: int = typer.Option(5),
    epochs: Optional[int] = EpochsOpt,
    image_size: Optional[int] = ImageSizeOpt,
    batch_size: Optional[int] = BatchSizeOpt,
    lr: Optional[float] = typer.Option(None, help="One peak learning rate for every architecture (default: each its own, "
                                       "1e-3; 1e-4 for the VGGs)."),
    label_smoothing: Optional[float] = LabelSmoothingOpt,
    ema: Optional[float] = EmaOpt,
    mixup: Optional[float] = MixupOpt,
    cutmix: Optional[float] = CutmixOpt,
    mixstyle: Optional[float] = MixstyleOpt,
    val_fraction: Optional[float] = ValFractionOpt,
    select: Optional[str] = SelectOpt,
    checkpoint_every: Optional[int] = CheckpointEveryOpt,
    seed: Optional[int] = SeedOpt,
    group_by: Optional[str] = GroupByOpt,
    allidb1: Optional[Path] = AllIdb1Opt,
    fmt: Optional[str] = FormatOpt,
    field: Optional[float] = FieldOpt,
    labs: Optional[str] = LabsOpt,
    rotation: Optional[float] = RotationOpt,
    colour: Optional[float] = ColourOpt,
    hed: Optional[float] = HedOpt,
    blur: Optional[float] = BlurOpt,
    jpeg: Optional[float] = JpegOpt,
    lowres: Optional[float] = LowresOpt,
    balance: Optional[str] = BalanceOpt,
    guard: Optional[bool] = GuardOpt,
    device: Optional[str] = DeviceOpt,
    precision: Optional[str] = PrecisionOpt,
    workers: Optional[int] = WorkersOpt,
    devices: str = DevicesOpt,
    config: Optional[Path] = ConfigOpt,
    cross_data: Optional[Path] = typer.Option(None, "--cross-data", help="Labelled images from another lab (e.g. C-NMC): every "
                                              "run's fold models predict them, without and with Macenko stain normalisation."),
    stain_reference: Optional[Path] = typer.Option(None, "--stain-reference", help="With --cross-data: an image or folder of the "
                                                   "training domain to normalise toward (default: 8 images of --data)."),
    cross_lab: bool = typer.Option(False, "--cross-lab", help="Also leave each laboratory of the data out in turn, per architecture "
                                   "(LAB=PATH sources or a cell bank), and put the held-out table in the report."),
    only: Optional[str] = typer.Option(None, "--only", help="With --cross-lab: also train on this laboratory alone and score every other one."),
    as_json: bool = JsonOpt,
):
    """The paper's Table 2: cross-validate several architectures with the same folds and budget; one report."""
    from leukodetect.jobs.compare import parse_archs, parse_protocols, run_comparison

    cfg = _run_config(locals())
    _check_output_folder(out_dir)
    result = run_comparison(cfg, out_dir, archs=parse_archs(archs), protocols=parse_protocols(protocols), folds=folds,
                            command=_command_line(), progress=_progress(), cross_data=cross_data, stain_reference=stain_reference,
                            cross_lab=cross_lab, only=only, devices=devices, log=_log)
    if as_json:
        _print_json(result)
    else:
        _print_comparison(result)


def _print_comparison(result: dict) -> None:
    """The pooled figures of every run, and of the cross-dataset check when there was one, as tables."""
    from leukodetect.reporting.report import format_value

    names = ("accuracy", "sensitivity", "specificity", "roc_auc")
    table = Table("protocol", "architecture", "accuracy", "sensitivity", "specificity", "ROC AUC", title="Pooled out-of-fold (95% CI in the report)")
    for r in result["runs"]:
        table.add_row(r["protocol"], r["arch"], *(format_value(n, r["pooled"][n]["value"]) for n in names))
    out.print(table)
    if "cross_dataset" in result:
        cross = result["cross_dataset"]
        table = Table("protocol", "architecture", "stain", "accuracy", "sensitivity", "specificity", "ROC AUC",
                      title=f"Cross-dataset check on {cross['data']}: fold-averaged P(blast), n={cross['n']}")
        for r in cross["runs"]:
            for variant in ("none", "macenko"):
                table.add_row(r["protocol"], r["arch"], variant, *(format_value(n, r[variant]["metrics"][n]["value"]) for n in names))
        out.print(table)
    out.print(f"Report: {result['report'][1]}")


@app.command()
@_errors_to_exit
def serve(
    checkpoint: Optional[Path] = typer.Option(None, help="A best.pt from train, cv or calibrate (default: the shipped ResNet-50)."),
    detector_checkpoint: Optional[Path] = typer.Option(None, help="Cell model for /v1/analyze's located cells (default: the shipped one that "
                                                       "goes with --locator: the five-laboratory model, or the ALL-IDB1 detector with colour)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback exposes the service to the network."),
    port: int = typer.Option(8000),
    threads: Optional[int] = typer.Option(None, help="Inference threads, PyTorch's and ONNX Runtime's "
                                          "(default: all cores; 1 on a machine busy with other jobs)."),
    backend: str = BackendOpt,
    allowed_host: Optional[list[str]] = typer.Option(None, "--allowed-host", metavar="HOST", help="A further host name the service answers to "
                                                     "(the Host header; *.example.org, or * for any); repeat for several. The bound "
                                                     "host and the localhost names are always answered; any other is refused (bound to 0.0.0.0 or :: without "
                                                     "this option, every host is answered)."),
    locator: str = LocatorOpt,
    locator_weights: Optional[Path] = LocatorWeightsOpt,
    pixel_size: Optional[float] = SmearPixelSizeOpt,
):
    """The lab service: web page at /, HTTP API at /v1 (see /docs), one model loaded once."""
    from leukodetect.runtime.scale import diameter_from_pixel_size
    from leukodetect.serving import serve as run_service
    from leukodetect.weights import resolve_locator

    learned = resolve_locator(locator_weights) if _locator_kind(locator) == "learned" else None
    run_service(checkpoint, detector_checkpoint=detector_checkpoint, locator=learned, host=host, port=port, threads=threads,
                rbc_diameter=diameter_from_pixel_size(pixel_size) if pixel_size else None,
                backend=backend, allowed_hosts=list(allowed_host) if allowed_host else None, log=_log)


@app.command()
@_errors_to_exit
def detect(
    images: list[Path] = typer.Argument(..., help="Smear photographs or folders of them (folders are searched recursively)."),
    checkpoint: Optional[Path] = typer.Option(None, help="The cell model that classifies the located cells (default: the shipped one that goes "
                                              "with --locator: the five-laboratory model, or the ALL-IDB1 detector with colour)."),
    locate_only: bool = typer.Option(False, "--locate-only", help="Only locate the white cells; do not classify them."),
    out_dir: Path = typer.Option(Path("detections"), "--out", help="Folder for the overlay, gallery and JSON of each image (never overwritten)."),
    review_low: Optional[float] = ReviewLowOpt,
    review_high: Optional[float] = ReviewHighOpt,
    smudge_gate: bool = typer.Option(True, "--smudge-gate/--no-smudge-gate",
                                     help="Call smudge the located objects the detector's smudge gate rejects (when it has one)."),
    cell_scorer: bool = typer.Option(True, "--cell-scorer/--no-cell-scorer",
                                     help="Combine P(blast) with the region measurements through the detector's cell scorer (when it has one)."),
    as_json: bool = typer.Option(False, "--json", help="Print each image's result as a JSON line."),
    backend: str = BackendOpt,
    locator: str = LocatorOpt,
    locator_weights: Optional[Path] = LocatorWeightsOpt,
    pixel_size: Optional[float] = SmearPixelSizeOpt,
    batch_scale: bool = BatchScaleOpt,
    edge_margin: float = EdgeMarginOpt,
):
    """Whole-smear detection: find white cells, classify each crop, count blasts, draw an overlay."""
    from leukodetect.detection.pipeline import check_declared_scale
    from leukodetect.jobs.detect import run_detect
    from leukodetect.runtime.scale import diameter_from_pixel_size
    from leukodetect.weights import resolve_detector, resolve_locator

    _check_output_folder(out_dir)
    checkpoint = None if locate_only else resolve_detector(checkpoint, _locator_kind(locator))
    if checkpoint is None and not locate_only:
        _log("No cell model for the located cells in this installation: locating cells only (pass --checkpoint).")
    learned = resolve_locator(locator_weights) if locator == "learned" else None
    declared = {"rbc_diameter": diameter_from_pixel_size(pixel_size)} if pixel_size else {}
    check_declared_scale(declared.get("rbc_diameter"), learned)
    rows = run_detect(images, checkpoint, out_dir, locator=learned, backend=backend, review_band=(review_low, review_high),
                      use_gate=smudge_gate, use_scorer=cell_scorer, edge_margin=edge_margin, batch_scale=batch_scale, progress=_progress(),
                      log=_log, **declared)
    _print_detections(rows, out_dir, as_json)
    if all("error" in r for r in rows):
        raise typer.Exit(1)


def _declare_pixel_sizes(sources: list, items: list[str]) -> list:
    """``--pixel-size LAB=UM`` options folded into the named sources as their declared red-cell diameters
    (``LAB=PATH@PIXELS``); one sentence for a malformed item or a laboratory no ``--data`` names."""
    from dataclasses import replace

    from leukodetect.runtime.scale import diameter_from_pixel_size

    sizes = {}
    for item in items:
        lab, _, number = item.partition("=")
        try:
            sizes[lab] = float(number)
        except ValueError:
            sizes[lab] = 0.0
        if not lab or sizes[lab] <= 0:
            raise LeukoError(f"--pixel-size {item!r}: give LAB=NUMBER with a positive number, e.g. --pixel-size bccd=0.086.")
    if unknown := sorted(set(sizes) - {s.lab for s in sources}):
        raise LeukoError(f"--pixel-size names {', '.join(unknown)}, which no --data names ({', '.join(s.lab for s in sources)}).")
    return [replace(s, rbc_diameter=diameter_from_pixel_size(sizes[s.lab])) if s.lab in sizes else s for s in sources]


def _locator_kind(kind: str) -> str:
    if kind not in ("learned", "colour"):
        raise LeukoError(f"--locator {kind!r}: choose learned or colour.")
    return kind


_IGNORE_RADIUS_HELP = (
    "Red-cell diameters around each object the colour locator finds on a photograph whose blasts alone are annotated "
    "(ALL-IDB1's ALL photographs): left out of the loss instead of taught as background; 0: none.")


@app.command("train-locator")
@_errors_to_exit
def train_locator(
    data: list[str] = typer.Option(..., "--data", help="LAB=PATH[:FORMAT], repeated: the allidb1, bccd and pbc layouts give white-cell positions."),
    out_file: Path = typer.Option(..., "--out", help="The new locator file (.safetensors); never overwritten."),
    iterations: int = typer.Option(2000, help="Training steps (batches of 16 patches of 128 pixels)."),
    seed: int = typer.Option(0),
    ignore_radius: float = typer.Option(1.0, help=_IGNORE_RADIUS_HELP),
):
    """Train the learned white-cell locator from scratch on annotated smear photographs (minutes on a CPU)."""
    from leukodetect.jobs.cells import LabSource
    from leukodetect.jobs.locator import run_train_locator
    from leukodetect.training.locator import LocatorRecipe

    path = run_train_locator([LabSource.parse(d) for d in data], out_file, recipe=LocatorRecipe(iterations=iterations, seed=seed, ignore_radius=ignore_radius),
                             log=_log, progress=_progress())
    out.print(f"Locator written to {path}")


@app.command("locator-eval")
@_errors_to_exit
def locator_eval(
    data: list[str] = typer.Option(..., "--data", help="LAB=PATH[:FORMAT], repeated: allidb1, bccd and pbc train and test; aria tests only."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (finished folds in it are kept: rerun to resume)."),
    folds: int = typer.Option(3, help="Pooled folds, split by photograph (byte-identical photographs together)."),
    iterations: int = typer.Option(2000, help="Training steps per fold."),
    every: int = typer.Option(1, help="Use every n-th image of the large layouts (pbc, aria)."),
    seed: int = typer.Option(0),
    ignore_radius: float = typer.Option(1.0, help=_IGNORE_RADIUS_HELP),
    colour_baseline: bool = typer.Option(True, help="Score the colour locator on the same photographs too (it is not "
                                                    "trained, so its rows are the same in every run; minutes per fold)."),
):
    """White-cell recall and precision per laboratory: pooled folds and each laboratory held out, beside the colour locator."""
    from leukodetect.jobs.cells import LabSource
    from leukodetect.jobs.locator import run_locator_eval
    from leukodetect.training.locator import LocatorRecipe

    run_locator_eval([LabSource.parse(d) for d in data], out_dir, folds=folds, every=every, colour_baseline=colour_baseline,
                     recipe=LocatorRecipe(iterations=iterations, seed=seed, ignore_radius=ignore_radius), log=_log, progress=_progress())
    out.print((out_dir / "report.md").read_text(encoding="utf-8"), highlight=False, markup=False)


def _print_detections(rows: list[dict], out_dir: Path, as_json: bool) -> None:
    """One JSON line per image, or one sentence per analysed image and where the outputs are."""
    with _writing_results():
        for r in rows:
            if as_json:
                print(json.dumps({k: v for k, v in r.items() if k != "cells"} | {"cells": r.get("cells", [])}))
            elif "error" not in r:
                smudge = f", {r['n_smudge']} smudge" if r.get("n_smudge") else ""
                why = f" ({r['reason']})" if r.get("reason") else ""
                out.print(f"{r['image']}: {r['verdict']}{why}, {r['n_blast']} blast / {r['n_cells']} white cells{smudge} "
                          f"({r['timing']['total_s']:.1f}s)", highlight=False)
        if not as_json:
            out.print(f"Outputs in {out_dir}.")
        sys.stdout.flush()
    analysed = [r for r in rows if "error" not in r]
    unlike = sum(bool(r.get("n_unlike_training")) for r in analysed)
    if (hint := unlike_training_hint(unlike, len(analysed), f"{unlike} of {len(analysed)} smears hold white cells")) is not None:
        err.print(f"note: {hint}", highlight=False)


@app.command("detect-eval")
@_errors_to_exit
def detect_eval(
    data: Path = DataOpt,
    out_dir: Path = typer.Option(..., "--out", help="New folder for crops, fold models, metrics.json and report.md."),
    folds: int = typer.Option(5, help="Folds, split by photograph."),
    epochs: int = DetEpochsOpt,
    image_size: int = DetImageSizeOpt,
    arch: str = DetArchOpt,
    batch_size: int = DetBatchSizeOpt,
    locate_only: bool = typer.Option(False, help="Score localisation only (no classifier): fast."),
    seed: int = typer.Option(0, help="Seed of the folds, the crop classifier, the gate and the scorer (repeat with others to see the spread)."),
    crop_factor: float = CropFactorOpt,
    smudge_gate: bool = SmudgeGateTrainOpt,
    gate_keep: float = GateKeepOpt,
    cell_scorer: bool = CellScorerTrainOpt,
    photo_context: bool = PhotoContextOpt,
    val_fraction: float = DetValFractionOpt,
    label_smoothing: float = DetLabelSmoothingOpt,
    locator: str = typer.Option("colour", "--locator", help="How the held-out photographs' white cells are found: colour, or learned "
                                "(a locator trained in each fold on that fold's training photographs, never on its held-out ones)."),
    locator_data: Optional[list[str]] = typer.Option(None, "--locator-data", help="LAB=PATH, repeated: more positioned smears for each "
                                                     "fold's learned locator (e.g. bccd=../shared/datasets/BCCD)."),
    locator_iterations: int = typer.Option(2000, help="Training steps of each fold's learned locator."),
    edge_margin: float = EdgeMarginOpt,
    as_json: bool = JsonOpt,
):
    """Evaluate whole-smear detection on ALL-IDB1 with folds by photograph."""
    from leukodetect.jobs.detect_eval import run_detect_eval

    cfg = _detector_config(locals())
    _check_output_folder(out_dir)
    metrics = run_detect_eval(data, out_dir, cfg, progress=_progress(), command=_command_line(), log=_log)
    if as_json:
        _print_json(metrics)
    else:
        out.print((out_dir / "report.md").read_text(), highlight=False)


@app.command("smear-eval")
@_errors_to_exit
def smear_eval(
    data: list[str] = typer.Option(..., "--data", help="LAB=PATH[:FORMAT], repeated: labelled smears (allidb1, aria or bccd layouts)."),
    out_dir: Path = typer.Option(..., "--out", help="New folder for smears.csv, metrics.json and report.md."),
    checkpoint: Optional[Path] = typer.Option(None, help="The cell model that classifies the located cells (default: as detect's)."),
    locator: str = LocatorOpt,
    locator_weights: Optional[Path] = LocatorWeightsOpt,
    unseen_from: Optional[Path] = typer.Option(None, "--unseen-from", help="The cell bank (cells.csv) the cell model was trained from: "
                                               "score only the smears none of whose cells (or near-duplicates') it trained on."),
    every: int = typer.Option(1, help="Score every n-th smear of each source."),
    review_low: Optional[float] = ReviewLowOpt,
    review_high: Optional[float] = ReviewHighOpt,
    backend: str = BackendOpt,
    pixel_size: Optional[list[str]] = typer.Option(None, "--pixel-size", metavar="LAB=UM", help="A laboratory's micrometres per "
                                                   "pixel, declared for all its smears instead of measured on each (learned "
                                                   "locator only; the same as --data LAB=PATH@PIXELS with the red-cell "
                                                   "diameter in pixels); repeat for several."),
    batch_scale: bool = BatchScaleOpt,
    edge_margin: float = EdgeMarginOpt,
):
    """Score the smear pipeline as it is (no training) on labelled smears: verdict accuracy per laboratory with 95% intervals."""
    from leukodetect.jobs.cells import LabSource
    from leukodetect.jobs.smear_eval import run_smear_eval
    from leukodetect.runtime.classifier import Classifier
    from leukodetect.runtime.locator import WhiteCellLocator
    from leukodetect.weights import resolve_detector, resolve_locator

    _check_output_folder(out_dir)
    sources = _declare_pixel_sizes([LabSource.parse(d) for d in data], pixel_size or [])
    path = resolve_detector(checkpoint, _locator_kind(locator))
    if path is None:
        raise LeukoError("No cell model to score with: pass --checkpoint (this installation has no shipped one).")
    clf = Classifier.from_checkpoint(path, backend=backend, log=_log)
    learned = WhiteCellLocator.load(resolve_locator(locator_weights)) if locator == "learned" else None
    run_smear_eval(sources, clf, out_dir, locator=learned, unseen_from=unseen_from, trained_on=clf.bundle.get("trained_on", ()),
                   every=every, review_band=(review_low, review_high), edge_margin=edge_margin, batch_scale=batch_scale, progress=_progress(),
                   log=_log)
    out.print((out_dir / "report.md").read_text(encoding="utf-8"), highlight=False, markup=False)


@app.command("train-detector")
@_errors_to_exit
def train_detector(
    data: Path = DataOpt,
    out_dir: Path = typer.Option(..., "--out", help="New folder for the crops and the model (rerun to continue an interrupted run)."),
    epochs: int = DetEpochsOpt,
    image_size: int = DetImageSizeOpt,
    arch: str = DetArchOpt,
    batch_size: int = DetBatchSizeOpt,
    crop_factor: float = CropFactorOpt,
    smudge_gate: bool = SmudgeGateTrainOpt,
    gate_keep: float = GateKeepOpt,
    cell_scorer: bool = CellScorerTrainOpt,
    photo_context: bool = PhotoContextOpt,
    val_fraction: float = DetValFractionOpt,
    label_smoothing: float = DetLabelSmoothingOpt,
):
    """Train the crop classifier for 'detect' on every photograph of an ALL-IDB1-style folder (detect-eval's recipe)."""
    from leukodetect.jobs.detect_eval import run_train_detector

    cfg = _detector_config(locals())
    _check_output_folder(out_dir)
    best = run_train_detector(data, out_dir, cfg, progress=_progress(), command=_command_line(), log=_log)
    out.print(f"Detector crop classifier: {best} (use: leukodetect detect IMAGE --checkpoint {best}).", highlight=False)


@app.command()
@_errors_to_exit
def benchmark(
    archs: str = typer.Option("resnet50", help="Comma-separated architectures (see 'leukodetect models')."),
    image_size: int = typer.Option(224),
    batch_size: int = typer.Option(16, help="Training batch, as for train."),
    steps: int = typer.Option(5, help="Timed training steps per path, after one warm-up step."),
    data: Optional[Path] = typer.Option(None, "--data", help="Images for the data-pipeline figures (default: the bundled sample)."),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers for the data-pipeline figures."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also time ONNX Runtime."),
    as_json: bool = JsonOpt,
    out_file: Optional[Path] = typer.Option(None, "--out", help="Also write the result as JSON to this file."),
):
    """Training, inference and data-pipeline speed of our paths against a naive float32 baseline."""
    from leukodetect.jobs.benchmark import (
        BenchmarkConfig,
        render_benchmark,
        run_benchmark,
    )
    from leukodetect.utils import write_json

    cfg = BenchmarkConfig(archs=tuple(a.strip() for a in archs.split(",") if a.strip()), image_size=image_size,
                          batch_size=batch_size, steps=steps, data=str(data) if data else None, num_workers=workers, onnx=onnx)
    result = run_benchmark(cfg, log=_log)
    if out_file is not None:
        write_json(out_file, result)
    if as_json:
        _print_json(result)
    else:
        out.print(Group(*render_benchmark(result)))


@app.command()
@_errors_to_exit
def models():
    """List the registered architectures."""
    from leukodetect.models import get_spec, list_models

    table = Table("name", "description")
    for name in list_models():
        table.add_row(name, get_spec(name).description)
    out.print(table)


@data_app.command("check")
@_errors_to_exit
def data_check(
    path: Path = typer.Argument(..., help="Data folder or CSV manifest; a folder in no known layout is checked as unlabelled images."),
    fmt: Optional[str] = FormatOpt,
    as_json: bool = JsonOpt,
):
    """Counts, sizes, modes, duplicates and every unreadable file, with reasons, of a data set or any folder of images;
    exit status 1 when a file is bad."""
    from leukodetect.data.check import check_dataset, render_check

    report = check_dataset(path, fmt or "auto", progress=_progress())
    if as_json:
        _print_json(report)
    else:
        out.print(render_check(report), highlight=False, markup=False)  # "[folders]" is the format, not a style
    if not report["ok"]:  # a bad file: scripts can rely on the status
        raise typer.Exit(1)


@app.command()
@_errors_to_exit
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder (a new one is made if it exists)."),
    train: bool = typer.Option(False, "--train", help="Instead: train ResNet-50 from scratch on the bundled cells, evaluate "
                               "it and predict a few (minutes on a CPU; the training pipeline, not a useful model)."),
    epochs: Optional[int] = typer.Option(None, help="With --train: epochs (default 20)."),
    image_size: Optional[int] = typer.Option(None, help="With --train: square input size in pixels (default 160)."),
):
    """The shipped models on the bundled C-NMC cells and BCCD smear fields: predictions, overlays, gallery and one
    HTML page (index.html), in seconds; --train trains ResNet-50 on the bundled cells instead."""
    from leukodetect.jobs.demo import run_demo, run_training_demo

    training = {k: v for k, v in {"epochs": epochs, "image_size": image_size}.items() if v is not None}
    if training and not train:
        raise LeukoError("--epochs and --image-size set the training demonstration: add --train.")
    if train:
        result = run_training_demo(out_dir, **training, command=_command_line(), log=_log, progress=_progress())
    else:
        result = run_demo(out_dir, log=_log, progress=_progress())
    with _writing_results():
        out.print("\n".join(result["summary"]), highlight=False, markup=False, soft_wrap=True)


def _print_result(result: dict, as_json: bool, report: dict, title: str, folds: dict | None = None) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    if as_json:
        _print_json(result)
        return
    out.print(metrics_table(report, title, folds))
    if report.get("labs"):
        from leukodetect.reporting.report import LAB_HEADER, lab_table_rows

        table = Table(*LAB_HEADER, title="Per laboratory")
        for row in lab_table_rows(report["labs"]):
            table.add_row(*map(str, row))
        out.print(table)
    out.print(f"Outputs in {result['out_dir']}")


def _print_json(result) -> None:
    with _writing_results():
        print(json.dumps(result, indent=2, default=str))


def metrics_table(report: dict, title: str, folds: dict | None = None) -> Table:
    from leukodetect.reporting.report import format_value

    table = Table("metric", "value", "95% CI", *(["fold mean ± sd"] if folds else []), title=title)
    for name, e in report["metrics"].items():
        ci = f"{format_value(name, e['ci_low'])} – {format_value(name, e['ci_high'])}"
        row = [name, format_value(name, e["value"]), ci]
        if folds:
            f = folds.get(name, {})
            row.append(f"{format_value(name, f.get('mean'))} ± {format_value(name, f.get('sd'))}")
        table.add_row(*row)
    c = report["confusion"]
    table.caption = f"n={report['n']}  TP={c['tp']} FN={c['fn']} FP={c['fp']} TN={c['tn']}  threshold {report['threshold']:.2f}"
    return table


def main() -> None:
    app()
