"""One loaded Guard shared by many threads gives exactly the serial results, and
classifying many images does not grow the process: no leaked memory, Python objects
or file descriptors, on good inputs and on the error paths."""
from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guard.errors import InputError

THREADS = 8
CALLS_PER_THREAD = 200
LEAK_CALLS = 10_000
WARM_UP_CALLS = 500
# Allowed growth of the resident set over LEAK_CALLS calls. Keeping one preprocessed input
# per call (3 x 32 x 32 float32 = 12 KiB) would add 120 MB over 10,000 calls, one decoded
# 40 x 56 image 67 MB: any per-call leak of image data breaks this bound, while allocator
# noise (malloc arenas, torch's CPU allocator caches) stays within a few MB.
RSS_GROWTH_LIMIT = 50 * 2 ** 20
# Python objects may grow by a few caches (logging, typing, Pillow plugin registries) but
# not by anything per call: 10,000 calls leaking one object each would add 10,000.
OBJECT_GROWTH_LIMIT = 1_000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Distinct images in every accepted form (each image differs, so do their results)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    items = []
    for index in range(12):
        height, width = 24 + 4 * index, 48 - 2 * index
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        form = index % 4
        if form == 0:
            items.append(array)
        elif form == 1:
            items.append(torch.from_numpy(array).permute(2, 0, 1).float() / 255)
        elif form == 2:
            image = Image.fromarray(array)
            image.load()
            items.append(image)
        else:
            path = folder / f"image{index}.png"
            Image.fromarray(array).save(path)
            items.append(path)
    return items


def call(model, inputs, step: int):
    """The step-th call of a thread: one image, or a list of three."""
    if step % 5 == 4:
        return [result.probs for result in model.classify([inputs[(step + k) % len(inputs)] for k in range(3)])]
    return model.classify(inputs[step % len(inputs)]).probs


def test_threads_give_exactly_the_serial_results(model, inputs):
    expected = {step: call(model, inputs, step) for step in range(len(inputs) * 5)}
    assert len({str(probs) for probs in expected.values()}) > len(inputs)  # results tell the calls apart
    mismatches, errors = [], []
    start = threading.Barrier(THREADS)

    def work(thread: int):
        try:
            start.wait()
            for call_number in range(CALLS_PER_THREAD):
                step = (call_number + 7 * thread) % len(expected)  # threads interleave different inputs
                got = call(model, inputs, step)
                if got != expected[step]:  # exact float equality, not closeness
                    mismatches.append((thread, step))
                if call_number % 50 == 0:  # error paths run concurrently too
                    try:
                        model.classify([inputs[0], torch.full((3, 8, 8), float("nan"))])
                    except InputError as error:
                        assert str(error).startswith("input 1: ")
                    else:
                        errors.append("a NaN image was classified")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(index,)) for index in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert not errors, errors[:3]
    assert not mismatches, f"{len(mismatches)} of {THREADS * CALLS_PER_THREAD} results differ, first {mismatches[0]}"


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_many_calls_do_not_grow_the_process(model, inputs, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = [torch.full((3, 8, 8), float("nan")), broken, tmp_path / "missing.png", np.zeros((4, 4), np.int64)]

    def run(calls: int) -> None:
        for step in range(calls):
            if step % 100 == 99:  # an error now and then: exceptions must not keep frames alive
                with pytest.raises(InputError):
                    model.classify(bad[(step // 100) % len(bad)])
            else:
                model.classify(inputs[step % len(inputs)])

    run(WARM_UP_CALLS)  # first calls fill caches: allocator pools, Pillow plugins, lazy imports
    gc.collect()
    rss, objects, descriptors = resident_bytes(), len(gc.get_objects()), open_descriptors()
    run(LEAK_CALLS)
    gc.collect()
    rss_growth = resident_bytes() - rss
    object_growth = len(gc.get_objects()) - objects
    assert rss_growth < RSS_GROWTH_LIMIT, f"resident set grew by {rss_growth / 2 ** 20:.1f} MiB"
    assert object_growth < OBJECT_GROWTH_LIMIT, f"{object_growth} more Python objects"
    assert open_descriptors() <= descriptors, "file descriptors leaked"
