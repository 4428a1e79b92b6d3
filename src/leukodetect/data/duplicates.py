"""Find exact duplicate images and merge them into shared split groups.

The ALL-IDB releases contain byte-identical copies under different names (ALL-IDB2 Im223_0 ==
Im257_0). A copy on each side of a train/test split leaks the test set into training, so
duplicates must share a group, and so must everything already sharing a group with either.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import imagehash
import numpy as np
from rich.progress import track
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from leukodetect.data.records import Record
from leukodetect.errors import BadImageError
from leukodetect.runtime.images import open_rgb, pixel_hash


def hash_records(records: Sequence[Record], *, progress: bool = False) -> dict[Path, str | None]:
    """Pixel hash of every record's image, or None where the image cannot be read.

    Unreadable files are not an error here: reporting them is :func:`check_dataset`'s job.
    """
    hashes: dict[Path, str | None] = {}
    for record in track(records, description="Hashing images", disable=not progress):
        try:
            hashes[record.path] = pixel_hash(open_rgb(record.path))
        except BadImageError:
            hashes[record.path] = None
    return hashes


def duplicate_sets(records: Sequence[Record], hashes: dict[Path, str | None]) -> list[list[Record]]:
    """Sets of two or more records whose images have identical pixels.

    Each set is sorted by path and the sets by their first path. Records without a hash (unread
    or unreadable) are never duplicates.
    """
    by_hash: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        digest = hashes.get(record.path)
        if digest is not None:
            by_hash[digest].append(record)
    sets = [sorted(same, key=lambda r: r.path) for same in by_hash.values() if len(same) > 1]
    return sorted(sets, key=lambda same: same[0].path)


def effective_groups(records: Sequence[Record], hashes: dict[Path, str | None]) -> list[str]:
    """One split group per record, merging records that share a group or a pixel hash.

    The merge is transitive (connected components of the "same group or same pixels" graph), and
    each component is named after its smallest original group, so the result is deterministic
    and unchanged for records that have no duplicates.
    """
    n = len(records)
    if n == 0:
        return []
    rows, cols = [], []
    by_group = [record.group for record in records]
    by_pixels = [hashes.get(record.path) for record in records]
    for keys in (by_group, by_pixels):
        first_seen: dict[str, int] = {}
        for index, value in enumerate(keys):
            if value is None:
                continue
            # Linking every member to the first one of its key is enough for connectivity.
            rows.append(first_seen.setdefault(value, index))
            cols.append(index)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    names: dict[int, str] = {}
    for record, comp in zip(records, component):
        names[comp] = min(names.get(comp, record.group), record.group)
    return [names[comp] for comp in component]


#: Largest Hamming distance (of 64 bits) between the perceptual hashes of two near-duplicate images.
#: On the Aria fields the closest pairs of distinct captures are 14-16 bits apart (a few across
#: classes); adjacent captures of one field and re-saved copies are 0-12 apart.
NEAR_DUPLICATE_BITS = 10


def near_duplicate_groups(records: Sequence[Record], *, max_bits: int = NEAR_DUPLICATE_BITS) -> list[Record]:
    """The records with groups merged where their images are near-duplicates (perceptual hash, imagehash's pHash).

    For data sets without patient ids that hold several captures of one field (Aria): the copies
    must never straddle a split. Each merged group is named after its smallest member group, as in
    :func:`effective_groups`; unreadable images keep their group.
    """
    hashes = []
    for record in records:
        try:
            hashes.append(imagehash.phash(open_rgb(record.path)).hash.reshape(-1))
        except BadImageError:
            hashes.append(None)
    readable = [i for i, h in enumerate(hashes) if h is not None]
    if len(readable) < 2:
        return list(records)
    bits = np.stack([hashes[i] for i in readable])
    distance = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    rows, cols = np.nonzero(np.triu(distance <= max_bits, k=1))
    graph = coo_matrix((np.ones(len(rows)), ([readable[r] for r in rows], [readable[c] for c in cols])), shape=(len(records),) * 2)
    _, component = connected_components(graph, directed=False)
    names: dict[int, str] = {}
    for record, comp in zip(records, component):
        names[comp] = min(names.get(comp, record.group), record.group)
    return [dataclasses.replace(r, group=names[c]) for r, c in zip(records, component)]
