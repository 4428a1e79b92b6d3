"""Turn a data-set folder (or a manifest CSV) into a sorted list of :class:`Record`.

Each known layout has an indexer registered under a short name in :data:`FORMATS`;
:func:`index_dataset` picks one by name or by :func:`detect_format`. Indexers only read names,
folders and annotation files: they never decode images (that is :mod:`leukodetect.data.check`'s
job), so indexing 50-megapixel smears is instant and a broken image is still listed.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree

from leukodetect.data.records import Point, Record
from leukodetect.errors import LeukoError
from leukodetect.runtime.images import IMAGE_SUFFIXES, REFUSED_SUFFIXES

Indexer = Callable[[Path], list[Record]]

#: Indexers by format name, filled by :func:`register_format`.
FORMATS: dict[str, Indexer] = {}

#: Folder / label names understood by the ``folders`` and ``manifest`` formats (lower case).
POSITIVE_NAMES = frozenset(
    {"blast", "all", "1", "leukemia", "leukemic", "malignant", "positive", "abnormal"}
)
NEGATIVE_NAMES = frozenset(
    {"normal", "hem", "0", "healthy", "benign", "negative", "non-blast", "nonblast"}
)

_ALL_IDB_NAME = re.compile(r"^Im\d+_(?P<label>[01])$")
_CNMC_NAME = re.compile(r"^UID_(?P<patient>[^_]+)_.*_(?P<cls>all|hem)$", re.IGNORECASE)
_CNMC_CSV_COLUMNS = {"Patient_ID", "new_names", "labels"}
_ALL_IDB1_OTHERS = Path("extras/ALL-IDB-Patches_AngeloUNIMI/ALL-IDB1/other")
#: Optional manifest columns, read into the record fields of the same names.
MANIFEST_OPTIONAL = ("lab", "kind", "parent")


def register_format(name: str) -> Callable[[Indexer], Indexer]:
    """Register an indexer under ``name``; a name already taken is a ValueError."""

    def decorator(indexer: Indexer) -> Indexer:
        if name in FORMATS:
            raise ValueError(f"Data-set format {name!r} is already registered.")
        FORMATS[name] = indexer
        return indexer

    return decorator


def index_dataset(path: str | Path, fmt: str = "auto") -> list[Record]:
    """Index a data set into records sorted by path.

    Args:
        path: the data-set folder, or a manifest CSV.
        fmt: a name from :data:`FORMATS`, or "auto" to use :func:`detect_format`.

    Raises:
        LeukoError: the path is missing, the format unknown, the layout broken, or no image found.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise LeukoError(f"Data set {path} does not exist; check the path.")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise LeukoError(
            f"Unknown data-set format {fmt!r} for {path}; use one of: auto, {', '.join(sorted(FORMATS))}."
        )
    records = sorted(FORMATS[fmt](path), key=lambda record: record.path)
    if not records:
        raise LeukoError(f"Data set {path} holds no images in the {fmt!r} layout; check the path or --format.")
    return records


def detect_format(path: str | Path) -> str:
    """Guess the layout of a data set from its file names and folders.

    Tried in order: a .csv file (manifest), ALL-IDB1 (im + xyc), ALL-IDB2 (ImNNN_L.tif),
    C-NMC 2019 (UID_..._all/hem names or its labels CSV), BCCD (JPEGImages + Annotations),
    Aria (Benign/Early/Pre/Pro), PBC (cell-type folders), class-per-folder.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "manifest"
        raise LeukoError(f"Data set {path} is a file but not a manifest CSV; give a folder or a .csv file.")
    if _find_allidb1_root(path) is not None:
        return "allidb1"
    if _find_allidb2_dir(path) is not None:
        return "allidb2"
    if _looks_like_cnmc(path):
        return "cnmc"
    if _find_bccd_root(path) is not None:
        return "bccd"
    if _find_class_root(path, ARIA_CLASSES) is not None:
        return "aria"
    if _find_class_root(path, PBC_CLASSES) is not None:
        return "pbc"
    if any(_label_from_name(folder.name) is not None for folder in _subfolders(path)):
        return "folders"
    raise LeukoError(
        f"Could not recognise the layout of {path} (tried manifest, allidb1, allidb2, cnmc, bccd, aria, pbc, folders); "
        "pass --format explicitly or arrange images in class folders such as blast/ and normal/."
    )


# --- ALL-IDB2 -------------------------------------------------------------------------------------


@register_format("allidb2")
def index_allidb2(path: Path) -> list[Record]:
    """ALL-IDB2 single-cell crops ``ImNNN_L.tif``: label L, each crop its own group.

    Accepts the ``img`` folder, the ``ALL_IDB2`` folder above it, or the data-set root holding
    ``ALL_IDB2/img``. The data set's own readme is ignored.
    """
    folder = _find_allidb2_dir(path)
    if folder is None:
        raise LeukoError(
            f"No ALL-IDB2 images (ImNNN_L.tif) found in {path}; point to the ALL_IDB2/img folder."
        )
    return [
        Record(path=image, label=_allidb_label(image), group=image.stem)
        for image in _images_in(folder)
    ]


def _find_allidb2_dir(path: Path) -> Path | None:
    """Return the folder holding ALL-IDB2 ``ImNNN_L.tif`` files among path and its usual subfolders."""
    for folder in (path, path / "img", path / "ALL_IDB2" / "img"):
        if folder.is_dir() and any(
            _ALL_IDB_NAME.match(file.stem) and file.suffix.lower() in {".tif", ".tiff"}
            for file in folder.iterdir()
        ):
            return folder
    return None


# --- ALL-IDB1 -------------------------------------------------------------------------------------

#: Where Loddo and Putzu's white-cell masks of ten ALL-IDB1 photographs sit, relative to the data set's folder.
MASKS = Path("extras/ALL-IDB1-masks_andrealoddo")


def find_masks(data: Path) -> Path | None:
    """The white-cell mask folder beside an ALL-IDB1 folder (it or up to three folders above), if present."""
    data = Path(data).resolve()
    for base in (data, *data.parents[:3]):
        if (base / MASKS).is_dir():
            return base / MASKS
    return None


def mask_regions(masks: Path | None, stem: str):
    """The label image (numpy, 0 background) of the white-cell mask of ALL-IDB1 photograph ``stem`` in the folder ``masks``
    (:func:`find_masks`), or None where it has none. Pixels connect through their sides: the masks draw touching cells
    apart, meeting at corners only, so each region is one cell (152 on the ten masked photographs; connected through
    corners too, 106 regions: clumps of touching cells)."""
    mask = masks / f"{stem}_WBCs.tif" if masks is not None else None
    if mask is None or not mask.is_file():
        return None
    import numpy as np
    from PIL import Image
    from scipy import ndimage as ndi

    with Image.open(mask) as image:
        return ndi.label(np.asarray(image).astype(bool))[0]


@register_format("allidb1")
def index_allidb1(path: Path, others_dir: Path | None = None) -> list[Record]:
    """ALL-IDB1 smear photographs ``im/ImNNN_L.jpg`` with blast centroids ``xyc/ImNNN_L.xyc``.

    Label L is image level (1 = photograph from an ALL patient); each photograph is its own group.
    ``others`` (centroids of the other annotated objects) come from ``others_dir``, or from the
    ALL-IDB-Patches ``extras`` folder beside ``ALL_IDB1`` when it exists; an image without an
    others file gets ``others=None``.

    Args:
        path: the ``ALL_IDB1`` folder, the folder holding it, or its ``im`` folder.
        others_dir: folder of ``ImNNN_L.xyc`` files for the non-blast objects.
    """
    root = _find_allidb1_root(path)
    if root is None:
        raise LeukoError(
            f"No ALL-IDB1 layout (im/ and xyc/ folders) found at {path}; point to the ALL_IDB1 folder."
        )
    if others_dir is None and (root.parent / _ALL_IDB1_OTHERS).is_dir():
        others_dir = root.parent / _ALL_IDB1_OTHERS
    records = []
    for image in _images_in(root / "im"):
        xyc = root / "xyc" / f"{image.stem}.xyc"
        if not xyc.is_file():
            raise LeukoError(
                f"Image {image} has no blast annotation file {xyc}; restore it or remove the image."
            )
        others_file = others_dir / f"{image.stem}.xyc" if others_dir is not None else None
        others = read_xyc(others_file) if others_file is not None and others_file.is_file() else None
        records.append(
            Record(
                path=image,
                label=_allidb_label(image),
                group=image.stem,
                blasts=read_xyc(xyc),
                others=others,
            )
        )
    return records


def find_allidb1(data_path: Path) -> Path | None:
    """An ALL-IDB1 folder beside an ALL-IDB2 path (the official layouts sit side by side)."""
    for parent in Path(data_path).resolve().parents:
        for name in ("ALL-IDB1", "ALL_IDB1"):
            if (parent / name).is_dir():
                return parent / name
    return None


def read_xyc(path: str | Path) -> tuple[Point, ...]:
    """Read an ALL-IDB ``.xyc`` file: one ``x y`` centroid (pixels) per line, tab or space separated.

    Empty files (healthy photographs), blank lines, stray whitespace and CRLF endings are fine.

    Raises:
        LeukoError: a line that is not two numbers, naming the file and line number.
    """
    path = Path(path)
    points = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                x, y = (float(field) for field in fields)
            except ValueError:
                raise LeukoError(
                    f"Annotation file {path} line {number} is {line.strip()!r}, not 'x y'; "
                    "fix or remove that line."
                ) from None
            points.append((x, y))
    return tuple(points)


def _find_allidb1_root(path: Path) -> Path | None:
    """Return the folder that holds ``im/`` and ``xyc/``: path itself, its ``ALL_IDB1``, or im's parent."""
    candidates = [path, path / "ALL_IDB1"]
    if path.name == "im":
        candidates.append(path.parent)
    for root in candidates:
        if (root / "im").is_dir() and (root / "xyc").is_dir():
            return root
    return None


def _allidb_label(image: Path) -> int:
    """Read the label digit of an ALL-IDB name ``ImNNN_L``, refusing any other name."""
    match = _ALL_IDB_NAME.match(image.stem)
    if match is None:
        raise LeukoError(
            f"Image {image} is not named like ALL-IDB (ImNNN_0 or ImNNN_1); rename or move it, "
            "or index the folder with --format folders or manifest."
        )
    return int(match["label"])


# --- C-NMC 2019 -----------------------------------------------------------------------------------


@register_format("cnmc")
def index_cnmc(path: Path) -> list[Record]:
    """C-NMC 2019 cells ``UID_<patient>_..._(all|hem).<ext>`` anywhere under ``path``.

    Label: all = 1 (blast), hem = 0. Group: ``patient:<patient>``, so a patient never straddles a
    split. Files of the original preliminary-test folder (``1.bmp``, ``2.bmp`` ...) are resolved
    through the ``Patient_ID,new_names,labels`` CSV found in their folder or its parent.
    """
    records = []
    csv_maps: dict[Path, dict[str, tuple[str, int]]] = {}
    for image in _images_under(path):
        match = _CNMC_NAME.match(image.stem)
        if match is not None:
            label = 1 if match["cls"].lower() == "all" else 0
            records.append(Record(path=image, label=label, group=f"patient:{match['patient']}"))
            continue
        if image.parent not in csv_maps:
            csv_maps[image.parent] = _cnmc_csv_map(image.parent)
        entry = csv_maps[image.parent].get(image.name)
        if entry is None:
            raise LeukoError(
                f"Image {image} is neither named UID_<patient>_..._all/hem nor listed in a C-NMC "
                "labels CSV (Patient_ID,new_names,labels); rename it, add the CSV, or remove it."
            )
        patient_id, label = entry
        records.append(Record(path=image, label=label, group=f"patient:{_cnmc_patient(patient_id)}"))
    return records


def _looks_like_cnmc(path: Path) -> bool:
    """True when some image under path has a C-NMC name, or a C-NMC labels CSV sits in path."""
    if any(_CNMC_NAME.match(image.stem) for image in _images_under(path)):
        return True
    return bool(_cnmc_csv_map(path))


def _cnmc_csv_map(folder: Path) -> dict[str, tuple[str, int]]:
    """Map ``new_names`` to (Patient_ID, label) from C-NMC labels CSVs in folder or its parent."""
    mapping: dict[str, tuple[str, int]] = {}
    for csv_path in sorted([*folder.glob("*.csv"), *folder.parent.glob("*.csv")]):
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not _CNMC_CSV_COLUMNS <= set(reader.fieldnames or ()):
                continue
            for row in reader:
                try:
                    mapping[row["new_names"].strip()] = (row["Patient_ID"].strip(), int(row["labels"]))
                except (ValueError, AttributeError):
                    raise LeukoError(
                        f"C-NMC labels file {csv_path} line {reader.line_num} is malformed; "
                        "fix that line (labels must be 0 or 1)."
                    ) from None
    return mapping


def _cnmc_patient(patient_id: str) -> str:
    """The patient token of a CSV Patient_ID, which is a UID file name in the real release."""
    match = _CNMC_NAME.match(Path(patient_id).stem)
    return match["patient"] if match is not None else patient_id


# --- class-per-folder -----------------------------------------------------------------------------


@register_format("folders")
def index_folders(path: Path) -> list[Record]:
    """One subfolder per class (e.g. ``blast/`` and ``normal/``); every image is its own group.

    Images are collected recursively inside each class folder. Hidden folders are ignored.
    """
    records = []
    for folder in _subfolders(path):
        label = _label_from_name(folder.name)
        if label is None:
            raise LeukoError(
                f"Folder {folder} is not a known class name; rename it to one of "
                f"{_accepted_names()} or move it out of {path}."
            )
        for image in _images_under(folder):
            group = image.relative_to(path).with_suffix("").as_posix()
            records.append(Record(path=image, label=label, group=group))
    return records


# --- manifest CSV ---------------------------------------------------------------------------------


@register_format("manifest")
def index_manifest(path: Path) -> list[Record]:
    """A CSV with header ``path,label[,group][,lab][,kind][,parent]``; paths are relative to the CSV's folder.

    Labels are 0/1 or a class name accepted by the ``folders`` format. A missing group becomes
    the path as written, i.e. each image its own group. ``lab`` names the laboratory (the cell
    banks of :mod:`leukodetect.jobs.cells` write it), ``kind`` what the image is within its data
    set and ``parent`` the field a cell was cut from.
    """
    if not path.is_file():
        raise LeukoError(f"Manifest {path} is not a file; give the path of a CSV with path,label columns.")
    records = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not {"path", "label"} <= set(reader.fieldnames or ()):
            raise LeukoError(
                f"Manifest {path} has header {reader.fieldnames}, not path,label[,group]; fix its first line."
            )
        for row in reader:
            where = f"Manifest {path} line {reader.line_num}"
            written = (row["path"] or "").strip()
            if not written:
                raise LeukoError(f"{where} has no path; fill it in or delete the row.")
            label = _label_from_name((row["label"] or "").strip())
            if label is None:
                raise LeukoError(
                    f"{where} has label {row['label']!r}; use 0, 1 or one of {_accepted_names()}."
                )
            image = path.parent / written
            if not image.is_file():
                raise LeukoError(f"{where} names {image}, which does not exist; fix the path or delete the row.")
            group = (row.get("group") or "").strip() or written
            extra = {k: (row.get(k) or "").strip() or None for k in MANIFEST_OPTIONAL}
            records.append(Record(path=image, label=label, group=group, **extra))
    return records


# --- PBC (Barcelona): normal cells in cell-type folders ----------------------------------------------

#: PBC's cell-type folders (Acevedo et al. 2020); every cell in them is normal.
PBC_CLASSES = frozenset({"lymphocyte", "neutrophil", "monocyte", "eosinophil", "basophil", "ig", "erythroblast", "platelet"})


@register_format("pbc")
def index_pbc(path: Path) -> list[Record]:
    """PBC normal cells ``<type>/<name>.jpg`` (or the folder above them): label 0, kind = the cell type.

    Every cell is its own group (PBC gives no donor ids); exact duplicates are merged into one group
    when a run prepares its splits (:func:`leukodetect.data.duplicates.effective_groups`).
    """
    root = _find_class_root(path, PBC_CLASSES)
    if root is None:
        raise LeukoError(f"No PBC cell-type folders ({', '.join(sorted(PBC_CLASSES))}) found in {path}; point to PBC_dataset_normal_DIB.")
    return [
        Record(path=image, label=0, group=f"pbc:{folder.name}/{image.stem}", kind=folder.name)
        for folder in _subfolders(root) if folder.name.lower() in PBC_CLASSES
        for image in _images_under(folder)
    ]


# --- Aria (Tehran): smear fields, benign or ALL --------------------------------------------------------

#: Aria's folders and their labels: hematogones (benign) and three B-ALL subtypes.
ARIA_CLASSES = {"benign": 0, "early": 1, "pre": 1, "pro": 1}


@register_format("aria")
def index_aria(path: Path) -> list[Record]:
    """Aria smear fields ``{Benign,Early,Pre,Pro}/<name>.jpg``: Benign = 0, the ALL subtypes = 1 (per field).

    Each field is its own group here; exact and near-duplicate fields (adjacent captures of one
    smear) are merged by content when a run prepares its splits
    (:func:`leukodetect.data.duplicates.split_groups`).
    """
    root = _find_class_root(path, ARIA_CLASSES)
    if root is None:
        raise LeukoError(f"No Aria folders (Benign, Early, Pre, Pro) found in {path}; point to the Original folder.")
    return [
        Record(path=image, label=ARIA_CLASSES[folder.name.lower()], group=f"aria:{image.stem}", kind=folder.name)
        for folder in _subfolders(root) if folder.name.lower() in ARIA_CLASSES
        for image in _images_under(folder)
    ]


def _find_class_root(path: Path, classes) -> Path | None:
    """The folder holding class folders named in ``classes`` (case-insensitive): path or one level below."""
    for folder in (path, *(_subfolders(path) if path.is_dir() else [])):
        if folder.is_dir() and sum(sub.name.lower() in classes for sub in _subfolders(folder)) >= 2:
            return folder
    return None


# --- BCCD: normal smear fields with white-cell boxes ------------------------------------------------------


@register_format("bccd")
def index_bccd(path: Path) -> list[Record]:
    """BCCD fields ``JPEGImages/*.jpg`` with Pascal VOC boxes ``Annotations/*.xml``: healthy (label 0).

    ``boxes`` holds the white-cell (WBC) boxes (``cells`` their centres); each field is its own group.
    """
    root = _find_bccd_root(path)
    if root is None:
        raise LeukoError(f"No BCCD layout (JPEGImages/ and Annotations/) found at {path}; point to the BCCD folder.")
    records = []
    for image in _images_in(root / "JPEGImages"):
        xml = root / "Annotations" / f"{image.stem}.xml"
        boxes = read_voc_boxes(xml, "WBC") if xml.is_file() else ()
        records.append(Record(path=image, label=0, group=f"bccd:{image.stem}", kind="smear field", boxes=boxes))
    return records


def read_voc_boxes(path: Path, name: str) -> tuple[tuple[float, float, float, float], ...]:
    """The (x0, y0, x1, y1) boxes of class ``name`` in a Pascal VOC annotation file."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as exc:
        raise LeukoError(f"Annotation file {path} cannot be read ({exc}); restore it or remove its image.") from exc
    boxes = []
    for obj in root.iter("object"):
        if (obj.findtext("name") or "").strip() != name:
            continue
        box = obj.find("bndbox")
        try:
            boxes.append(tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
        except (TypeError, ValueError, AttributeError):
            raise LeukoError(f"Annotation file {path} has a {name} box without numeric xmin/ymin/xmax/ymax; fix it.") from None
    return tuple(boxes)


def _find_bccd_root(path: Path) -> Path | None:
    for root in (path, path / "BCCD"):
        if (root / "JPEGImages").is_dir() and (root / "Annotations").is_dir():
            return root
    return None


# --- helpers --------------------------------------------------------------------------------------


def _label_from_name(name: str) -> int | None:
    """1 for a positive class name, 0 for a negative one, None otherwise (case-insensitive)."""
    name = name.strip().lower()
    if name in POSITIVE_NAMES:
        return 1
    if name in NEGATIVE_NAMES:
        return 0
    return None


def _accepted_names() -> str:
    """The accepted class names, for error messages."""
    positive = "/".join(sorted(POSITIVE_NAMES))
    negative = "/".join(sorted(NEGATIVE_NAMES))
    return f"positive {positive} or negative {negative}"


def _subfolders(path: Path) -> list[Path]:
    """Visible immediate subfolders of path, sorted."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    """True for a visible file whose suffix is an image suffix."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def refused_files(path: Path) -> list[Path]:
    """The files of a refused format (GIF) under a data folder, which the indexers leave out: a run says so."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in REFUSED_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in folder, sorted."""
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere under folder, sorted, skipping hidden folders."""
    return sorted(
        p
        for p in folder.rglob("*")
        if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
