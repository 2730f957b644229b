"""Property-based: on every backend, pmap equals list(map(...)) whatever the input and options."""

from __future__ import annotations

import pytest
from conftest import BACKENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parfor import Chunks, gmap, pmap

PROPERTIES = settings(max_examples=25, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])


def shift(x: int, by: int = 0) -> int:
    return x * 3 + by


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTIES
@given(items=st.lists(st.integers(), max_size=300), ordered=st.booleans(),
       with_index=st.booleans(), n_processes=st.integers(1, 3), by=st.integers(-5, 5),
       as_generator=st.booleans())
def test_pmap_equals_map(backend, items, ordered, with_index, n_processes, by, as_generator):
    expected = [shift(x, by) for x in items]
    source = iter(items) if as_generator else items
    result = pmap(shift, source, kwargs={"by": by}, backend=backend, bar=False,
                  yield_ordered=ordered, yield_index=with_index, n_processes=n_processes)
    if with_index:
        assert sorted(result) == list(enumerate(expected))
        if ordered:
            assert result == list(enumerate(expected))
    elif ordered:
        assert result == expected
    else:
        assert sorted(result) == sorted(expected)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTIES
@given(items=st.lists(st.integers(), min_size=1, max_size=200), size=st.integers(1, 50))
def test_chunked_input_equals_map(backend, items, size):
    chunks = Chunks(items, size=size)
    assert sum(pmap(list, chunks, backend=backend, bar=False), []) == items


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTIES
@given(items=st.lists(st.integers(), max_size=200), take=st.integers(0, 200))
def test_gmap_prefix_equals_map(backend, items, take):
    results = gmap(shift, iter(items), backend=backend, bar=False)
    got = [value for _, value in zip(range(take), results, strict=False)]
    results.close()
    assert got == [shift(x) for x in items[:take]]
