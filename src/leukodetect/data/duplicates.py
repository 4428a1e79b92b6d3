"""Find exact duplicate images and merge them into shared split groups.

The ALL-IDB releases contain byte-identical copies under different names (ALL-IDB2 Im223_0 ==
Im257_0). A copy on each side of a train/test split leaks the test set into training, so
duplicates must share a group, and so must everything already sharing a group with either.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

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
