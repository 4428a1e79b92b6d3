"""Run configuration: dataclasses the CLI fills, saved as YAML into every run folder.

The resolved configuration travels with every checkpoint, so a run can be rebuilt, resumed or
audited from its folder alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from leukodetect.errors import LeukoError
from leukodetect.models.registry import get_spec, list_models
from leukodetect.utils import atomic_write_text

PROTOCOLS = ("clean", "paper")
GROUP_BY = ("default", "source")
BALANCE = ("none", "labs")
#: How the kept epoch is chosen (``TrainConfig.select``).
SELECT = ("best", "last")


@dataclass(kw_only=True)
class DataConfig:
    """Where the images are and how they are split.

    ``protocol="clean"`` splits first and augments only the training part; ``"paper"`` expands the
    whole set to ``paper_total`` images first and then splits, as Shalini & Angel Viji (2022) did,
    which lets copies of one cell sit on both sides of the split.
    """

    path: str = ""
    format: str = "auto"
    image_size: int = 224
    test_fraction: float = 0.2
    # Several laboratories in one run: "LAB=PATH[:FORMAT][@PIXELS]" entries (then ``path`` is not used); their
    # cells are cut into a cell bank in the run folder (jobs/cells.py).
    sources: list[str] = field(default_factory=list)
    # Red-cell diameters across the model's input (0: images are used as they are, the paper's recipe).
    field_diameters: float = 0.0
    # Laboratories kept from a cell bank given as ``path`` (empty: all).
    labs: list[str] = field(default_factory=list)
    # Share of the images held out to select the epoch (validation loss); 0: none, the last epoch is kept
    # (how the shipped default model is trained, on every image).
    val_fraction: float = 0.15
    split_file: str | None = None
    protocol: str = "clean"
    paper_total: int = 2470
    group_by: str = "default"  # "source": ALL-IDB2 crops of one ALL-IDB1 photograph share a group
    allidb1: str | None = None  # ALL-IDB1 folder for group_by="source" (default: found beside the data)
    num_workers: int = 0


@dataclass(kw_only=True)
class AugmentConfig:
    """On-the-fly training augmentation (the paper's list plus a vertical flip)."""

    rotation: float = 20.0  # degrees, uniform in [-rotation, rotation]
    shift: float = 0.1  # width and height shift, fraction of the image side
    zoom: float = 0.1  # scale uniform in [1 - zoom, 1 + zoom]
    shear: float = 10.0  # degrees
    hflip: bool = True
    vflip: bool = True
    # Stain and camera robustness (all 0: off, the paper's recipe). See data/transforms.py.
    colour: float = 0.0  # brightness, contrast and saturation jitter up to this fraction
    hed: float = 0.0  # haematoxylin-eosin-DAB jitter: each stain's density scaled by 1 +- hed and shifted by +- hed / 10
    blur: float = 0.0  # probability of a Gaussian blur (sigma 0.1-1.5 px): cameras and upsampled low-magnification fields
    jpeg: float = 0.0  # probability of JPEG compression at quality 50-95
    lowres: float = 0.0  # probability of a resolution drop: down by 1.5-4x and back up (fewer pixels per cell: another camera or magnification)

    #: The stain and camera settings above: a recipe with all of them 0 is the "colour-free" one.
    CAMERA: ClassVar[tuple[str, ...]] = ("colour", "hed", "blur", "jpeg", "lowres")


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = "resnet50"
    weights: str | None = None  # None (from scratch, as in the paper), "imagenet", or a file


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 16
    optimizer: str = "adamw"
    # Peak learning rate; None takes the architecture's own (``ModelSpec.scratch_lr``: 1e-3, 1e-4 for
    # the VGGs, which have no batch norm). Training writes the number it used into config.yaml.
    lr: float | None = None
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    # Exponential moving average of the weights, updated after every optimizer step (0: off). The
    # averaged weights are the ones validated, selected and saved.
    ema: float = 0.0
    # Batch mixing (torchvision.transforms.v2 MixUp / CutMix): the Beta(alpha, alpha) parameter of each, 0 off.
    # With both on, each batch gets one of the two at random. Targets become soft, so the training
    # accuracy is measured against the larger share of each mixed image.
    mixup: float = 0.0
    cutmix: float = 0.0
    # MixStyle (training.mixstyle): the probability, per batch and per ResNet stage, of mixing the images' channel
    # statistics of the first three stages between images of the batch; 0 off. Training only: the saved network is the usual one.
    mixstyle: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: str = "auto"  # auto, fp32, bf16, fp16
    # How training images are drawn: "none" (each once per epoch, shuffled), or "labs": with replacement,
    # weighted so both classes weigh the same and, within a class, each laboratory by the square root
    # of its size (a laboratory of 2000 normal cells does not drown one of 70).
    balance: str = "none"
    # Fit the out-of-distribution guard after training (needs a validation part to set its threshold).
    guard: bool = False
    # Which epoch is kept as best.pt: "best", the lowest validation loss; or "last", the last epoch, the validation
    # part still scored every epoch and used by the guard's threshold. Without a validation part it is the last.
    select: str = "best"
    # last.pt, the resume point (weights and optimizer state), is written every N epochs and after
    # the last one. 1 on a CPU, where an epoch takes minutes; more on a GPU, where writing a VGG's
    # 1.6 GB of state after every two-second epoch would take longer than the training.
    checkpoint_every: int = 1


@dataclass(kw_only=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build a config from a (possibly partial) nested dict; unknown keys are an error."""
        parts = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory  # type: ignore[misc]
            section = raw.get(f.name) or {}
            known = {g.name for g in dataclasses.fields(section_cls)}
            unknown = set(section) - known
            if unknown:
                raise LeukoError(
                    f"Unknown setting(s) {sorted(unknown)} in section '{f.name}': "
                    f"use one of {sorted(known)}."
                )
            parts[f.name] = section_cls(**section)
        unknown_sections = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown_sections:
            raise LeukoError(f"Unknown configuration section(s) {sorted(unknown_sections)}.")
        cfg = cls(**parts)
        cfg.validate()
        return cfg

    def resolved(self) -> RunConfig:
        """A copy with every per-architecture default filled in (the learning rate)."""

        cfg = RunConfig.from_dict(self.to_dict())
        if cfg.train.lr is None:
            cfg.train.lr = get_spec(cfg.model.arch).scratch_lr
        return cfg

    def validate(self) -> None:
        if self.data.protocol not in PROTOCOLS:
            raise LeukoError(f"Unknown protocol '{self.data.protocol}': use one of {PROTOCOLS}.")
        if self.data.group_by not in GROUP_BY:
            raise LeukoError(f"Unknown --group-by '{self.data.group_by}': use one of {GROUP_BY}.")
        if self.data.image_size < 16:
            raise LeukoError(f"Image size {self.data.image_size} is too small: use 16 or more.")
        if self.train.epochs < 1 or self.train.batch_size < 1:
            raise LeukoError("Epochs and batch size must be at least 1.")
        if self.train.checkpoint_every < 1:
            raise LeukoError(f"--checkpoint-every {self.train.checkpoint_every} must be at least 1 (epochs between resume points).")
        if self.train.lr is not None and not self.train.lr > 0:
            raise LeukoError(f"--lr {self.train.lr} must be positive (or left out for the architecture's own).")
        if not 0 < self.data.test_fraction < 1:
            raise LeukoError(f"test_fraction {self.data.test_fraction} must be above 0 and below 1: the test part is what is scored.")
        if not 0 <= self.data.val_fraction < 1:
            raise LeukoError(f"--val-fraction {self.data.val_fraction} must be at least 0 (no validation part) and below 1.")
        if self.train.mixup < 0 or self.train.cutmix < 0:
            raise LeukoError(f"--mixup {self.train.mixup} and --cutmix {self.train.cutmix} must be 0 (off) or a positive Beta parameter such as 0.2 or 1.0.")
        if self.train.balance not in BALANCE:
            raise LeukoError(f"Unknown --balance '{self.train.balance}': use one of {BALANCE}.")
        if self.train.select not in SELECT:
            raise LeukoError(f"Unknown --select '{self.train.select}': use one of {SELECT}.")
        if self.data.field_diameters < 0:
            raise LeukoError(f"--field {self.data.field_diameters} must be 0 (images as they are) or a number of red-cell diameters such as 3.")
        if (min(self.augment.colour, self.augment.hed, self.augment.blur, self.augment.jpeg, self.augment.lowres) < 0
                or max(self.augment.blur, self.augment.jpeg, self.augment.lowres) > 1):
            raise LeukoError("Colour, HED, blur, JPEG and low-resolution augmentation must be 0 (off) or positive; blur, JPEG and "
                             "low resolution are probabilities (at most 1).")
        if not 0 <= self.train.mixstyle <= 1:
            raise LeukoError(f"--mixstyle {self.train.mixstyle} is not a probability: use 0 (off) or a value up to 1 such as 0.5.")
        if self.train.mixstyle and not get_spec(self.model.arch).style_stages:
            raise LeukoError(f"--mixstyle needs a network whose stages it can mix; {self.model.arch} has none: use "
                             f"{', '.join(name for name in list_models() if get_spec(name).style_stages)}, or leave --mixstyle out.")
        if not 0 <= self.train.ema < 1:
            raise LeukoError(f"--ema {self.train.ema} is not a decay: use 0 (off) or a value below 1 such as 0.98.")


#: Settings holding a path: two spellings of one file (``data``, ``./data``) are the same setting.
_PATH_SETTINGS = frozenset({"data.path", "data.split_file", "data.allidb1"})


def config_changes(before: RunConfig, after: RunConfig, *, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Every setting that differs between two configs, as ``"section.key OLD -> NEW"``, in field order.

    Args:
        ignore: ``"section.key"`` names left out of the comparison.
    """
    old, new = before.to_dict(), after.to_dict()
    changes = []
    for section, values in old.items():
        for key, was in values.items():
            name, now = f"{section}.{key}", new[section][key]
            if name not in ignore and not _same_setting(name, was, now):
                changes.append(f"{name} {_shown(was)} -> {_shown(now)}")
    return changes


def _same_setting(name: str, was: Any, now: Any) -> bool:
    if name in _PATH_SETTINGS and was and now:
        return Path(was).expanduser().resolve() == Path(now).expanduser().resolve()
    return was == now


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def save_config(cfg: RunConfig, path: Path) -> None:

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config(path: Path) -> RunConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise LeukoError(f"Cannot read the configuration {path}: {exc}.") from exc
    return RunConfig.from_dict(raw)
