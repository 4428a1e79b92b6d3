"""The record: one labelled image, the unit every indexer produces and every split consumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

Point = tuple[float, float]


@dataclass(frozen=True)
class Record:
    """One image of a data set.

    Attributes:
        path: the image file.
        label: 0 (normal / healthy) or 1 (blast / ALL); None where the layout gives no label.
        group: images sharing a group must stay on one side of every split (a patient, a source
            photograph, or the image itself when nothing better is known).
        blasts: ALL-IDB1 only: annotated blast centroids (x, y) in pixels.
        others: ALL-IDB1 only: centroids of the other annotated objects, if that folder was given.
        lab: the laboratory the image comes from (None where one data set is used alone).
        kind: what the image is within its data set, e.g. PBC's cell type or Aria's ALL subtype.
        parent: the photograph or field a cell crop was cut from (cells of one parent share its label).
        boxes: annotated white-cell boxes (x0, y0, x1, y1) in pixels of a smear field (BCCD's); their centres
            are :attr:`cells`.
    """

    path: Path
    label: int | None
    group: str
    blasts: tuple[Point, ...] | None = None
    others: tuple[Point, ...] | None = None
    lab: str | None = None
    kind: str | None = None
    parent: str | None = None
    boxes: tuple[tuple[float, float, float, float], ...] | None = None

    @property
    def cells(self) -> tuple[Point, ...] | None:
        """The annotated white-cell centres (x, y): the centres of :attr:`boxes` (None where none are drawn)."""
        return None if self.boxes is None else tuple(((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in self.boxes)
