"""Find exact duplicate images and merge them into shared split groups.

The ALL-IDB releases contain byte-identical copies under different names (ALL-IDB2 Im223_0 ==
Im257_0). A copy on each side of a train/test split leaks the test set into training, so
duplicates must share a group, and so must everything already sharing a group with either.
"""

from __future__ import annotations

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


def _key_edges(keys: Sequence[str | None]) -> tuple[list[int], list[int]]:
    """Edges linking every record to the first one with its key (enough for connectivity); None links nothing."""
    rows, cols, first_seen = [], [], {}
    for index, value in enumerate(keys):
        if value is not None:
            rows.append(first_seen.setdefault(value, index))
            cols.append(index)
    return rows, cols


def _phash_edges(bits: Sequence[np.ndarray | None], max_bits: int) -> tuple[list[int], list[int]]:
    """Edges between the records whose perceptual hashes differ in at most ``max_bits`` bits."""
    readable = [i for i, h in enumerate(bits) if h is not None]
    if len(readable) < 2:
        return [], []
    stacked = np.stack([bits[i] for i in readable])
    distance = (stacked[:, None, :] != stacked[None, :, :]).sum(-1)
    rows, cols = np.nonzero(np.triu(distance <= max_bits, k=1))
    return [readable[r] for r in rows], [readable[c] for c in cols]


def _merged_names(records: Sequence[Record], *edges: tuple[list[int], list[int]]) -> list[str]:
    """Connected components of the edges, each named after its smallest original group."""
    rows = [r for e in edges for r in e[0]]
    cols = [c for e in edges for c in e[1]]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(records),) * 2)
    _, component = connected_components(graph, directed=False)
    names: dict[int, str] = {}
    for record, comp in zip(records, component):
        names[comp] = min(names.get(comp, record.group), record.group)
    return [names[comp] for comp in component]


def effective_groups(records: Sequence[Record], hashes: dict[Path, str | None]) -> list[str]:
    """One split group per record, merging records that share a group or a pixel hash.

    The merge is transitive (connected components of the "same group or same pixels" graph), and
    each component is named after its smallest original group, so the result is deterministic
    and unchanged for records that have no duplicates.
    """
    if not records:
        return []
    return _merged_names(records, _key_edges([r.group for r in records]), _key_edges([hashes.get(r.path) for r in records]))


#: Largest Hamming distance (of 64 bits) between the perceptual hashes of two near-duplicate images.
#: On the Aria fields the closest pairs of distinct captures are 14-16 bits apart (a few across
#: classes); adjacent captures of one field and re-saved copies are 0-12 apart.
NEAR_DUPLICATE_BITS = 10


def _phash(rgb) -> np.ndarray:
    return imagehash.phash(rgb).hash.reshape(-1)


def split_groups(records: Sequence[Record], *, near_duplicates: bool = False, max_bits: int = NEAR_DUPLICATE_BITS) -> list[str]:
    """One split group per record, the rule every split follows: records sharing a group, identical pixels
    or, with ``near_duplicates``, perceptual hashes within ``max_bits`` share one (transitively), named after
    its smallest original group. Each image is decoded once; an unreadable one keeps its group."""
    pixels, bits = [], []
    for record in records:
        try:
            rgb = open_rgb(record.path)
        except BadImageError:
            pixels.append(None)
            bits.append(None)
            continue
        pixels.append(pixel_hash(rgb))
        bits.append(_phash(rgb) if near_duplicates else None)
    if not records:
        return []
    return _merged_names(records, _key_edges([r.group for r in records]), _key_edges(pixels), _phash_edges(bits, max_bits))
