"""The progress bar counts items, with or without a known length, on every backend."""

from __future__ import annotations

import gc
import io
import re
import sys
import time

import pytest

from parfor import Chunks, gmap, pmap
from parfor_core._progress import Progress


def test_callback_gets_running_count_of_items(backend):
    counts = []
    pmap(abs, range(500), bar=counts.append, backend=backend)
    assert counts == sorted(counts)
    assert counts[-1] == 500


class Counter:
    """A bar of the caller's own, as the original parfor's ParPool took: only ``update``."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def update(self, n: int) -> None:
        self.steps.append(n)


def test_a_bar_of_ones_own_is_moved_by_the_items_just_done(backend):
    counter = Counter()
    pmap(abs, range(500), bar=counter, backend=backend)
    assert sum(counter.steps) == 500 and all(step > 0 for step in counter.steps)


def test_a_tqdm_bar_of_ones_own_is_moved_and_left_open(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(tqdm, "monitor_interval", 0)  # no tqdm monitor thread left behind
    out = io.StringIO()
    with tqdm(total=600, file=out, mininterval=0) as shared:
        pmap(abs, range(200), bar=shared)
        pmap(abs, range(400), bar=shared)
        assert shared.n == 600 and not shared.disable
    assert "600/600" in out.getvalue()


def test_a_bad_desc_or_bar_keyword_is_named():
    with pytest.raises(TypeError, match="desc must be a string"):
        pmap(abs, range(10), desc=5)
    with pytest.raises(TypeError, match="bar must be"):
        pmap(abs, range(10), bar={})  # a mapping has an update method, but is no bar


@pytest.mark.parametrize("bar_kwargs", [{"position": "a"}, {"nrows": "tall"}, {"ncols": "wide"}])
def test_a_bar_value_tqdm_rejects_is_named_and_leaves_no_half_made_bar(bar_kwargs, monkeypatch):
    from parfor_core._progress import tqdm_class

    registered = set(tqdm_class()._instances)
    unraisable = []  # what a half-made bar's close raises when the garbage collector takes it
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(TypeError) as raised:
        pmap(abs, range(10), file=io.StringIO(), **bar_kwargs)
    (name, value), = bar_kwargs.items()
    assert re.search(f"given the bar keyword arguments {{.*'{name}': '{value}'",
                     " ".join(raised.value.__notes__))
    del raised  # its traceback holds tqdm's frames, and the bar in them
    gc.collect()
    assert set(tqdm_class()._instances) == registered
    assert unraisable == []


def test_tqdm_bar_counts_items_with_known_total(backend):
    out = io.StringIO()
    pmap(abs, range(300), backend=backend, file=out, desc="squares", mininterval=0)
    text = out.getvalue()
    assert "squares" in text
    assert "300/300" in text


def test_bar_without_length_shows_a_running_count(backend):
    out = io.StringIO()
    pmap(abs, (i for i in range(123)), backend=backend, file=out, mininterval=0)
    assert "123it" in out.getvalue()


def test_total_gives_a_generator_its_length(backend):
    out = io.StringIO()
    pmap(abs, (i for i in range(40)), total=40, backend=backend, file=out, mininterval=0)
    assert "40/40" in out.getvalue()


def test_bar_false_prints_nothing(backend, capsys):
    pmap(abs, range(50), bar=False, backend=backend)
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


def test_chunks_count_as_one_item_each(backend):
    counts = []
    pmap(len, Chunks(range(100), number=4), bar=counts.append, backend=backend)
    assert counts[-1] == 4


def test_gmap_bar_is_closed_when_the_generator_is_closed_early(backend):
    out = io.StringIO()
    results = gmap(abs, range(10_000), backend=backend, file=out, mininterval=0)
    next(results)
    results.close()
    assert out.getvalue().endswith("\n")  # tqdm ends the line when it closes


def test_the_bar_keeps_moving_when_quick_items_give_way_to_slow_ones():
    """tqdm by default redraws only after as many items as came per redraw so far, which quick
    chunks make thousands; the bar would then stand still through the slow items after them."""
    out = io.StringIO()
    progress = Progress(True, 20_005, bar_kwargs={"file": out})
    for _ in range(20):  # quick chunks of 1000 items
        time.sleep(0.015)
        progress.update(1000)
    for _ in range(5):  # then slow items, one at a time
        time.sleep(0.15)
        progress.update(1)
    progress.close()
    shown = {int(n) for n in re.findall(r"(\d+)/20005", out.getvalue())}
    assert len(shown & set(range(20_001, 20_005))) >= 3, sorted(shown)
