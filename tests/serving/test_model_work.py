"""ModelWork, the service's worker-thread side: requests that waited are answered by one forward pass."""

from __future__ import annotations

import asyncio

import pytest

from leukodetect.errors import LeukoError
from leukodetect.serving.app import ModelWork, Upload, _Waiting


class Counting:
    """Wraps a classifier and counts its batched forward passes."""

    def __init__(self, inner):
        self.inner, self.threshold, self.calls = inner, inner.threshold, []

    def call(self, prob, score=None):
        return self.inner.call(prob, score)

    def view(self, image, **kwargs):
        return self.inner.view(image, **kwargs)

    def image_outputs(self, images, *, batch_size):
        self.calls.append(len(images))
        return self.inner.image_outputs(images, batch_size=batch_size)


def test_waiting_requests_share_one_forward_pass_and_a_bad_upload_fails_only_its_own(classifier, tiny_tree):
    counting = Counting(classifier)
    work = ModelWork(counting, detector=None, max_pixels=10**6, intended_use="test")
    cells = sorted((tiny_tree / "blast").glob("blast_0*.png"))[:3]
    requests = [[Upload(cells[0].name, cells[0].read_bytes())],
                [Upload("broken.png", b"not an image")],
                [Upload(p.name, p.read_bytes()) for p in cells[1:]]]

    async def answer():
        loop = asyncio.get_running_loop()
        jobs = [_Waiting(uploads, loop.create_future(), loop) for uploads in requests]
        work.waiting.extend(jobs)
        await loop.run_in_executor(None, work.classify_waiting)
        return await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)

    first, broken, third = asyncio.run(answer())
    assert counting.calls == [3]  # the two good requests' three images, in one pass
    assert not work.waiting
    assert isinstance(broken, LeukoError) and "broken.png" in str(broken)
    assert [row["filename"] for row in first + third] == [p.name for p in cells]
    expected = classifier.predict_paths(cells)
    assert [row["prob_blast"] for row in first + third] == pytest.approx([p.prob_blast for p in expected], abs=1e-6)
