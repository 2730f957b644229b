"""Job: what runs again after a worker is lost, shared by the backends that see workers die."""

from __future__ import annotations

from parfor import WorkerDiedError
from parfor_backends._retrying import LOST_DATA_RETRIES, Job
from parfor_core import Call, Result, Task


def _job(items: list[int]) -> Job:
    return Job.of(Task(Call(abs), range(10, 10 + len(items)), items))


def test_a_task_whose_data_was_lost_runs_again_whole_and_counts_no_death():
    job = _job([-1, -2, -3])
    for _ in range(LOST_DATA_RETRIES):
        again = job.after_death("a dask worker", "lost dependencies", 1, "dask", blame=False)
        assert again is job and list(again.task.items) == [-1, -2, -3]
    assert job.deaths == 0
    outcome = job.after_death("a dask worker", "lost dependencies", 1, "dask", blame=False)
    assert isinstance(outcome, Result) and outcome.values == []
    error = outcome.failure.exception
    assert isinstance(error, WorkerDiedError)
    assert "input items 10 to 12 was lost with a worker 4 times in a row: lost dependencies" in (
        str(error))
    assert outcome.failure.worker == "a dask worker"


def test_a_task_whose_worker_died_is_split_and_a_lone_item_blamed():
    job = _job([-1, -2])
    first = job.after_death("worker process 1", "killed", 1, "processes")
    assert isinstance(first, Job) and list(first.task.items) == [-1]
    assert first.after_death("worker process 2", "killed", 1, "processes") is first
    outcome = first.after_death("worker process 3", "killed", 1, "processes")
    assert isinstance(outcome, Result)
    assert "input item 10 died 2 times in a row: killed" in str(outcome.failure.exception)
