"""A conformance suite for backends, for plugin authors and for parfor's own backends.

Subclass `BackendConformance` in a test module, name your backend, and pytest runs every check::

    from parfor_core.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "my-backend"

Needs pytest. The functions the checks send to workers live in this module, so that worker
processes can import them by name.
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from . import ParPool, gmap, pmap


class Boom(ValueError):
    """The error the failing checks raise in a worker."""


def square(x: int) -> int:
    return x * x


def scaled(x: int, factor: int, offset: int = 0) -> int:
    return x * factor + offset


def fail_on(x: int, bad: int, log_dir: str) -> int:
    Path(log_dir, f"{x}-{uuid.uuid4().hex}").touch()
    if x == bad:
        raise Boom(f"item {x} is bad")
    return x


def where(x: int) -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def nested(x: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    return where(x), pmap(where, range(3), bar=False)


def size_plus(i: int, data: bytes) -> int:
    return len(data) + i


class BackendConformance:
    """The behaviour every backend must have; set ``backend`` to its registered name."""

    backend: str

    def map(self, fun: Any, items: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return pmap(fun, items, *args, backend=self.backend, bar=False, **kwargs)

    def test_results_are_complete_and_in_order(self) -> None:
        assert self.map(square, range(57)) == [x * x for x in range(57)]

    def test_empty_one_and_generator_inputs(self) -> None:
        assert self.map(square, []) == []
        assert self.map(square, [7]) == [49]
        assert self.map(square, (x for x in range(9))) == [x * x for x in range(9)]

    def test_args_and_kwargs(self) -> None:
        assert self.map(scaled, range(5), (3,), {"offset": 1}) == [1, 4, 7, 10, 13]

    def test_lambdas_and_closures(self) -> None:
        offset = 5
        assert self.map(lambda x: x + offset, range(3)) == [5, 6, 7]

    def test_unordered_with_index(self) -> None:
        pairs = self.map(square, range(40), yield_ordered=False, yield_index=True)
        assert sorted(pairs) == [(x, x * x) for x in range(40)]

    def test_exception_keeps_its_type_and_names_the_item(self, tmp_path: Path) -> None:
        with pytest.raises(Boom, match="item 6 is bad") as caught:
            self.map(fail_on, range(20), (6, str(tmp_path)))
        assert any("raised by item 6" in note for note in caught.value.__notes__)
        runs = [name.split("-")[0] for name in os.listdir(tmp_path)]
        assert all(runs.count(x) == 1 for x in runs)  # no item ran twice
        assert self.map(square, [3]) == [9]  # usable afterwards

    def test_gmap_is_lazy(self) -> None:
        pulled = itertools.count()
        source = (next(pulled) for _ in itertools.count())
        results = gmap(square, source, backend=self.backend, bar=False)
        assert list(itertools.islice(results, 30)) == [x * x for x in range(30)]
        results.close()
        assert next(pulled) < 10_000

    def test_nested_calls_run_in_their_worker(self) -> None:
        for outer, inner in self.map(nested, range(3)):
            assert set(inner) == {outer}

    def test_progress_callback_counts_items(self) -> None:
        counts: list[int] = []
        pmap(square, range(30), backend=self.backend, bar=counts.append)
        assert counts and counts[-1] == 30 and counts == sorted(counts)

    def test_large_argument(self) -> None:
        data = os.urandom(2 << 20)  # over the size that some backends send through a file
        assert self.map(size_plus, range(6), (data,)) == [len(data) + i for i in range(6)]

    def test_parpool(self) -> None:
        with ParPool(scaled, (2,), backend=self.backend) as pool:
            for x in range(6):
                pool[x] = x
            pool.add_task(square, (9,), handle="nine")
            assert [pool[x] for x in range(6)] == [0, 2, 4, 6, 8, 10]
            assert pool["nine"] == 81
