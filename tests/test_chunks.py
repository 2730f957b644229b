"""Chunks: how long iterables are split, and the errors for inputs it cannot split."""

from __future__ import annotations

import pytest

from parfor import Chunks
from parfor_core import available_cpus


class SequenceIterator:
    def __init__(self, sequence):
        self.sequence, self.position = sequence, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == len(self.sequence):
            raise StopIteration
        self.position += 1
        return self.sequence[self.position - 1]

    def __len__(self):
        return len(self.sequence) - self.position


@pytest.mark.parametrize(
    ("make", "length"),
    [
        (lambda: range(10), None),
        (lambda: list(range(10)), None),
        (lambda: (i for i in range(10)), 10),
        (lambda: SequenceIterator(list(range(10))), None),
    ],
    ids=["range", "list", "generator", "iterator-with-len"],
)
def test_size_splits_into_even_chunks(make, length):
    chunks = Chunks(make(), size=2, length=length)
    assert len(chunks) == 5
    assert list(chunks) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_no_chunk_exceeds_size_and_sizes_are_even():
    chunks = Chunks(range(10), size=4)
    assert [len(c) for c in chunks] == [3, 3, 4]
    assert sum(chunks, []) == list(range(10))


def test_number_of_chunks():
    assert list(Chunks(range(7), number=3)) == [[0, 1], [2, 3], [4, 5, 6]]
    assert len(Chunks(range(3), number=10)) == 3  # never more chunks than items


def test_ratio_is_chunks_per_cpu():
    assert len(Chunks(range(1000), ratio=2)) == 2 * available_cpus()


def test_size_caps_number():
    assert len(Chunks(range(100), size=10, number=2)) == 10
    assert len(Chunks(range(100), size=60, number=4)) == 4


def test_several_iterables_side_by_side():
    assert list(Chunks(range(4), "abcd", number=2)) == [[[0, 1], ["a", "b"]],
                                                        [[2, 3], ["c", "d"]]]


def test_length_is_the_shortest_iterable():
    assert list(Chunks(range(5), "abc", size=2)) == [[[0], ["a"]], [[1, 2], ["b", "c"]]]


def test_default_is_one_chunk_per_cpu():
    assert len(Chunks(range(10_000))) == available_cpus()


def test_empty_input_has_no_chunks():
    assert list(Chunks([], size=3)) == []
    assert len(Chunks([], number=4)) == 0


def test_generator_with_size_streams_without_length():
    chunks = Chunks((i for i in range(7)), size=3)
    assert list(chunks) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(TypeError, match="unknown"):
        len(Chunks((i for i in range(7)), size=3))


def test_unknown_length_with_number_is_a_clear_error():
    with pytest.raises(TypeError, match="length="):
        Chunks((i for i in range(7)), number=3)


def test_wrong_length_is_a_clear_error():
    with pytest.raises(ValueError, match="ended after fewer items"):
        list(Chunks((i for i in range(7)), number=3, length=10))


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"number": -1}, {"ratio": 0}, {"size": 2.5},
                                    {"ratio": "a"}, {"ratio": True}, {"ratio": float("inf")},
                                    {"ratio": float("nan")}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Chunks(range(5), **kwargs)


@pytest.mark.parametrize(("old", "new", "value"), [("s", "size", 3), ("n", "number", 3),
                                                   ("r", "ratio", 1.5)])
def test_the_original_deprecated_names_still_work_and_warn(old, new, value):
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated, use '{new}'"):
        chunks = list(Chunks(range(10), **{old: value}))
    assert chunks == list(Chunks(range(10), **{new: value}))
    with pytest.raises(TypeError, match=f"both '{old}' and '{new}'"), \
            pytest.warns(DeprecationWarning):
        Chunks(range(10), **{old: value, new: value})


def test_numpy_integers_are_whole_numbers_too():
    import numpy

    chunks = Chunks(range(7), size=numpy.int64(3), length=numpy.int32(7))
    assert list(chunks) == [[0, 1], [2, 3], [4, 5, 6]]
    assert type(chunks.size) is int
