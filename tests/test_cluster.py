"""What only the cluster backends (dask, ray) do: where they connect, local clusters, lost
workers, cancelling on the cluster, and the message when their extra is not installed.

The behavioural suite runs on them too (conftest.py's ``backend`` fixture), against real
clusters started by the tests as separate commands.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from clusters import CLUSTER_NAMES, DaskCluster, RayCluster

import parfor
from parfor import ParforError, ParPool, WorkerDiedError, WorkerError, gmap, pmap
from parfor_backends.dask import DaskBackend
from parfor_core import Call, registry


def scheduler_of(_: int) -> str:
    """Which Dask scheduler the worker running this belongs to."""
    from distributed import get_worker

    return get_worker().scheduler.address


def thread_names() -> list[str]:
    import threading

    return [thread.name for thread in threading.enumerate()]


def slow_square(x: int, seconds: float = 0.05, log_dir: str | None = None) -> int:
    if log_dir is not None:  # one file per run of an item: reruns show
        Path(log_dir, f"{x}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(seconds)
    return x * x


def long_unless_zero(x: int, seconds: float = 30) -> int:
    if x:
        time.sleep(seconds)
    return x


def reruns(log_dir: Path) -> int:
    """How many item runs were repeats of an earlier run of the same item."""
    runs = [name.split("-")[0] for name in os.listdir(log_dir)]
    return len(runs) - len(set(runs))


def kill_on_five(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.fixture
def dask_address(cluster_addresses) -> str:
    return cluster_addresses("dask")


@pytest.fixture(scope="module")
def other_dask(tmp_path_factory):
    """A second Dask cluster, to tell which address a call used."""
    cluster = DaskCluster.start(tmp_path_factory.mktemp("other-dask"), n_workers=1)
    yield cluster
    registry.shutdown()  # disconnect pooled backends first
    cluster.stop()


# -- where the backends connect -----------------------------------------------------------------


@pytest.mark.backend("dask")
def test_the_environment_variable_names_the_cluster(dask_address):
    assert set(pmap(scheduler_of, range(4), backend="dask", bar=False)) == {dask_address}


@pytest.mark.backend("dask")
def test_address_precedence_block_over_environment_over_file(
        dask_address, other_dask, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("parfor.toml").write_text(f'[backends.dask]\naddress = "{other_dask.address}"\n')
    # the environment variable beats the project file
    assert set(pmap(scheduler_of, range(2), backend="dask", bar=False)) == {dask_address}
    # a config block beats the environment variable
    with parfor.config(backends={"dask": {"address": other_dask.address}}):
        assert set(pmap(scheduler_of, range(2), backend="dask", bar=False)) == {
            other_dask.address}
    # the project file, when nothing above it says otherwise
    monkeypatch.delenv("PARFOR_DASK_ADDRESS")
    assert set(pmap(scheduler_of, range(2), backend="dask", bar=False)) == {other_dask.address}


@pytest.mark.backend("dask")
def test_a_backend_instance_takes_the_address_as_argument(other_dask):
    backend = DaskBackend(address=other_dask.address)
    try:
        assert backend.n_workers == 1  # the cluster's own size, not one per CPU here
        assert set(pmap(scheduler_of, range(3), backend=backend, bar=False)) == {
            other_dask.address}
    finally:
        backend.shutdown()


@pytest.mark.backend("dask")
def test_an_unreachable_scheduler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("parfor_backends.dask.CONNECT_TIMEOUT", 2.0)
    with parfor.config(backends={"dask": {"address": "tcp://127.0.0.1:9"}}):
        with pytest.raises(ParforError, match=r"Cannot connect to the Dask scheduler at "
                                              r"'tcp://127.0.0.1:9'"):
            pmap(abs, range(4), backend="dask", bar=False)


# -- a local cluster when no address is given ---------------------------------------------------


@pytest.mark.backend("dask")
def test_without_an_address_dask_starts_and_stops_a_local_cluster(dask_address, monkeypatch):
    monkeypatch.delenv("PARFOR_DASK_ADDRESS")
    backend = DaskBackend(2)
    helper = psutil.Process(backend._local.process.pid)
    try:
        schedulers = set(pmap(scheduler_of, range(8), backend=backend, bar=False))
        assert len(schedulers) == 1 and dask_address not in schedulers
        assert schedulers.pop().startswith("tcp://127.0.0.1:")
        processes = [helper, *helper.children(recursive=True)]
        assert len(processes) >= 3  # the scheduler's process and two workers
        # No sampling profiler, whose thread crashed Dask's processes on free-threaded Python
        names = [*backend._client.run(thread_names).values(),
                 backend._client.run_on_scheduler(thread_names)]
        assert len(names) == 3 and all("MainThread" in each and "Profile" not in each
                                       for each in names)
    finally:
        backend.shutdown()
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert alive == []


@pytest.mark.backend("dask")
def test_a_local_cluster_that_lost_its_scheduler_is_replaced_and_leaves_nothing():
    in_a_child(local_cluster_loses_its_scheduler)


def local_cluster_loses_its_scheduler() -> None:
    os.environ.pop("PARFOR_DASK_ADDRESS", None)
    backend = DaskBackend(2)
    helper = psutil.Process(backend._local.process.pid)
    try:
        old = set(pmap(scheduler_of, range(8), backend=backend, bar=False))
        processes = [helper, *helper.children(recursive=True)]
        helper.kill()  # the scheduler's process; its workers are left without one
        with pytest.raises(WorkerError, match=r"Lost the connection to the Dask scheduler at "):
            pmap(scheduler_of, range(8), backend=backend, bar=False)
        new = set(pmap(scheduler_of, range(8), backend=backend, bar=False))
        assert len(new) == 1 and new != old
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert alive == []  # the old cluster's workers too
    finally:
        backend.shutdown()


def in_a_child(scenario: Callable[..., None], *arguments: object) -> None:
    """Run ``scenario(*arguments)`` of this module in a new Python process, with the Dask
    timeouts at 3 s. The scenarios kill a Dask scheduler, and once in CI a socket to a server
    that was gone (most likely one of theirs: not reproduced) was left open; its
    ResourceWarning, when the garbage collector found it, failed a later, unrelated test."""
    program = textwrap.dedent(f"""
        import parfor_backends._cluster, parfor_backends.dask, test_cluster
        parfor_backends._cluster.CONNECT_TIMEOUT = parfor_backends.dask.CONNECT_TIMEOUT = 3.0
        test_cluster.{scenario.__name__}(*{arguments!r})
    """)
    path = os.pathsep.join([str(Path(__file__).parent), *filter(None, sys.path)])
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr


SCRIPT = """
import os, sys
from parfor import pmap

def square(x):
    print("worker says", x)
    return x * x

# no `if __name__ == "__main__":` guard: the workers must not re-run this script
print(pmap(square, range(6), backend=sys.argv[1], bar=False), flush=True)
"""


def import_the_dask_backend(i: int) -> bool:
    import parfor_backends.dask  # noqa: F401 - its import is what is tested

    return True


@pytest.mark.backend("dask")
def test_importing_the_dask_backend_leaves_the_program_output_alone():
    code = ("import sys\nbefore = sys.stdout.line_buffering, sys.stderr.line_buffering\n"
            "import parfor_backends.dask\n"
            "print(before == (sys.stdout.line_buffering, sys.stderr.line_buffering))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.split() == ["True"]
    # A worker's sys.stdout is parfor's own stream: a function there may import it too.
    assert pmap(import_the_dask_backend, range(2), backend="processes", bar=False) == [True] * 2


@pytest.mark.parametrize("name", CLUSTER_NAMES)
def test_a_local_cluster_runs_a_script_without_main_guard_and_leaves_nothing(
        name, tmp_path, cluster_addresses):
    cluster_addresses(name)  # the test cluster is up; this script must start its own
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {key: value for key, value in os.environ.items() if not key.endswith("_ADDRESS")}
    before = _engine_processes()
    done = subprocess.run([sys.executable, str(script), name], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    # The results, printed once (the script did not run again in a worker); Ray forwards what
    # its workers print from a thread of its own, which may write into the middle of a line.
    assert done.stdout.count("[0, 1, 4, 9, 16, 25]") == 1
    if name == "dask":  # what the local workers print reaches the caller's terminal
        assert {f"worker says {x}" for x in range(6)} <= set(done.stdout.splitlines())
    deadline = time.monotonic() + 30
    while _engine_processes() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _engine_processes() - before == set()


@pytest.mark.backend("dask")
def test_a_killed_caller_takes_its_local_dask_cluster_with_it(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent("""
        import os, time
        from parfor import pmap
        from parfor_core import registry
        assert pmap(abs, range(4), backend="dask", bar=False) == [0, 1, 2, 3]
        print(registry._instances["dask"][0]._local.process.pid, flush=True)
        time.sleep(600)
    """))
    env = {key: value for key, value in os.environ.items() if key != "PARFOR_DASK_ADDRESS"}
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        helper = psutil.Process(int(caller.stdout.readline()))
        cluster = [helper, *helper.children(recursive=True)]
    finally:
        caller.kill()
        caller.wait()
        caller.stdout.close()
    _, alive = psutil.wait_procs(cluster, timeout=30)
    assert alive == []


@pytest.mark.backend("dask")
def test_ctrl_c_stops_a_local_dask_cluster_at_once_and_the_next_call_works(tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent("""
        import time
        from parfor import pmap
        from parfor_core import registry

        def long(x):
            time.sleep(60)

        try:
            pmap(long, range(8), backend="dask", bar=False)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print(pmap(abs, [-1, -2], backend="dask", bar=False), flush=True)
    """))
    env = {key: value for key, value in os.environ.items() if key != "PARFOR_DASK_ADDRESS"}
    before = _engine_processes()
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=env, start_new_session=True)
    try:
        _wait_until(lambda: any("spawn_main" in " ".join(p.cmdline())
                                for p in psutil.Process(caller.pid).children(recursive=True)),
                    "the local cluster's workers")
        time.sleep(2)  # the items are running
        started = time.monotonic()
        os.killpg(caller.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
        said = []  # the cluster's workers may print first (their output is relayed)
        while (line := caller.stdout.readline()) not in ("interrupted\n", ""):
            said.append(line)
        assert line == "interrupted\n", said
        assert time.monotonic() - started < 10
        rest, _ = caller.communicate(timeout=60)  # the cluster's own output is relayed too:
        assert "[1, 2]" in rest.splitlines()       # its log of the workers the Ctrl-C ended
        assert caller.returncode == 0
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        caller.stdout.close()
    _wait_until(lambda: not _engine_processes() - before, "the local clusters ending")


@pytest.mark.backend("ray")
def test_ray_uses_a_runtime_the_program_started_and_leaves_it_running():
    program = textwrap.dedent("""
        import ray
        from parfor import pmap
        from parfor_core import registry
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        print(pmap(abs, [-1, -2, -3], backend="ray", bar=False))
        registry.shutdown()
        print(ray.is_initialized())
        ray.shutdown()
    """)
    env = {key: value for key, value in os.environ.items() if key != "PARFOR_RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[1,", "2,", "3]", "True"]


@pytest.mark.backend("ray")
def test_ray_refuses_a_second_address_in_one_process(cluster_addresses):
    cluster_addresses("ray")
    assert pmap(abs, [-1], backend="ray", serial=False, bar=False) == [1]
    with parfor.config(backends={"ray": {"address": "127.0.0.1:1"}}):
        with pytest.raises(ParforError, match="one runtime per process.*127.0.0.1:1"):
            pmap(abs, [-1, -2], backend="ray", bar=False)
    assert pmap(abs, [-1, -2], backend="ray", bar=False) == [1, 2]  # the first one still works


@pytest.mark.backend("ray")
def test_an_unreachable_ray_cluster_is_a_clear_error():
    # ray.init retried for minutes (over 200 s) where nothing listened: the call hung.
    program = textwrap.dedent("""
        from parfor import pmap
        from parfor_core import ParforError
        try:
            pmap(abs, [-1, -2], backend="ray", bar=False)
        except ParforError as error:
            print(error)
    """)
    env = {**os.environ, "PARFOR_RAY_ADDRESS": "127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Cannot connect to the Ray cluster at '127.0.0.1:9': nothing "
                                  "answers at 127.0.0.1:9 (ConnectionRefusedError"), done.stdout


# -- lost workers ---------------------------------------------------------------------------


@pytest.mark.backend("dask")
def test_killing_a_dask_worker_mid_run_loses_no_result(tmp_path):
    cluster = DaskCluster.start(tmp_path, n_workers=2)
    log = tmp_path / "runs"
    log.mkdir()
    try:
        with parfor.config(backends={"dask": {"address": cluster.address}}), \
                ThreadPoolExecutor(1) as killer:
            victim = killer.submit(_kill_the_worker_of, STALLING_ITEM, log,
                                   cluster.task_processes,  # the `dask worker` command, all of it
                                   lambda worker: os.killpg(worker.pid, signal.SIGKILL))
            results = list(gmap(stalls_once, range(40), (str(log),), bar=False, backend="dask"))
        assert results == [x * x for x in range(40)]
        assert victim.result().wait(10) == -signal.SIGKILL
        assert reruns(log) >= 1  # what the lost worker was running ran again elsewhere
    finally:
        registry.shutdown()
        cluster.stop()


@pytest.mark.backend("dask")
def test_a_lost_scheduler_fails_the_call_naming_it_and_the_next_call_connects_again(tmp_path):
    in_a_child(scheduler_is_lost, str(tmp_path))


def scheduler_is_lost(folder: str) -> None:
    cluster = DaskCluster.start(Path(folder), n_workers=1)
    address = cluster.address
    lost = rf"Lost the connection to the Dask scheduler at {address} \({{}}\)"
    try:
        with parfor.config(backends={"dask": {"address": address}}):
            assert pmap(abs, [-1, 2], backend="dask", bar=False) == [1, 2]
            cluster.kill_scheduler()  # between two calls
            with pytest.raises(WorkerError, match=lost.format("3 tries to send a task")):
                pmap(abs, [-1, 2], backend="dask", bar=False)
            cluster.restart()  # at the same address: the next call works
            assert pmap(abs, [-3, 4], backend="dask", bar=False) == [3, 4]
            results = gmap(long_unless_zero, range(4), bar=False, backend="dask")
            assert next(results) == 0
            cluster.kill_scheduler()  # during a call, whose next item takes 30 s
            with pytest.raises(WorkerError, match=lost.format("waiting for a task")):
                next(results)

            cluster.restart()  # a ParPool's tasks are one call, for ever:
            with ParPool(long_unless_zero, bar=False, backend="dask") as pool:
                pool[1] = 1
                cluster.kill_scheduler()
                with pytest.raises(WorkerError, match=lost.format("waiting for a task")):
                    pool[1]
                cluster.restart()
                time.sleep(3.0)  # the call's wait to reconnect
                pool[2] = 0  # a task added later connects again
                assert pool[2] == 0
    finally:
        registry.shutdown()
        cluster.stop()


@pytest.mark.backend("ray")
def test_killing_a_ray_worker_mid_run_loses_no_result(cluster_addresses, tmp_path):
    cluster_addresses("ray")
    with ThreadPoolExecutor(1) as killer:
        victim = killer.submit(_kill_the_worker_of, STALLING_ITEM, tmp_path,
                               lambda: {pid: pid for pid in RayCluster.worker_pids()},
                               lambda pid: os.kill(pid, signal.SIGKILL))
        results = list(gmap(stalls_once, range(40), (str(tmp_path),), bar=False, backend="ray"))
    assert results == [x * x for x in range(40)]
    assert victim.result()
    assert reruns(tmp_path) >= 1  # what the killed worker was running ran again


#: The item whose first run stalls until the test kills its worker: a worker only seen to be
#: busy may, on a busy machine, be between two items by the time it is killed.
STALLING_ITEM = 12


def stalls_once(x: int, log_dir: str) -> int:
    """slow_square (0.05 s), but the first run of STALLING_ITEM takes a minute more."""
    first = x == STALLING_ITEM and not any(name.startswith(f"{x}-")
                                           for name in os.listdir(log_dir))
    value = slow_square(x, 0.05, log_dir)
    if first:
        time.sleep(60)
    return value


Victim = TypeVar("Victim")


def _kill_the_worker_of(item: int, log_dir: Path, processes: Callable[[], dict[int, Victim]],
                        kill: Callable[[Victim], object]) -> Victim:
    """Kill the worker that runs ``item`` as soon as its log shows it: ``processes()`` maps the
    pids that run items to what ``kill`` takes."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = [int(name.split("-")[1]) for name in os.listdir(log_dir)
                if name.startswith(f"{item}-")]
        if pids:
            victim = processes()[pids[0]]
            kill(victim)
            return victim
        time.sleep(0.01)
    raise AssertionError(f"no worker started item {item} in 30 s")


@pytest.mark.parametrize("name", CLUSTER_NAMES)
def test_an_item_that_keeps_killing_workers_fails_naming_it(name, cluster_addresses):
    cluster_addresses(name)
    with pytest.raises(WorkerDiedError, match="input item 5 died 2 times") as caught:
        pmap(kill_on_five, range(12), backend=name, bar=False)
    assert caught.value.indices == [5]
    assert caught.value.backend == name
    cluster_addresses(name)  # the cluster is whole again
    assert pmap(abs, [-1, -2], backend=name, bar=False) == [1, 2]


@pytest.mark.parametrize("name", CLUSTER_NAMES)
def test_a_parpool_task_that_keeps_killing_workers_is_named_by_its_handle(
        name, cluster_addresses):
    cluster_addresses(name)
    with ParPool(kill_on_five, backend=name) as pool:
        pool["fatal"] = 5
        with pytest.raises(WorkerDiedError) as caught:
            pool["fatal"]
    assert str(caught.value).startswith(
        "The worker running the task with handle 'fatal' died 2 times")
    cluster_addresses(name)  # the cluster is whole again


def timed_run(x: int, log_dir: str, killer: int) -> int:
    """Sleeps 0.4 s (``killer``: 0.3 s, then kills its worker), and logs when it ran."""
    start = time.monotonic()
    time.sleep(0.3 if x == killer else 0.4)
    Path(log_dir, f"{x}-{time.monotonic_ns()}").write_text(f"{start} {time.monotonic()}")
    if x == killer:
        os._exit(3)
    return x


@pytest.mark.parametrize("retries", [0, 1])
@pytest.mark.parametrize("name", CLUSTER_NAMES)
def test_an_item_that_killed_its_worker_runs_again_with_nothing_else_beside_it(
        name, retries, cluster_addresses, tmp_path):
    # A Dask worker holds more tasks than it runs and loses them all when it dies: an item
    # that died beside the killer, and ran again beside it, would be blamed in its place. So
    # the death that fails an item is one it died alone, even with retries = 0.
    cluster_addresses(name)
    with pytest.raises(WorkerDiedError, match="input item 2 died 2 times") as caught, \
            parfor.config(backends={name: {"retries": retries}}):
        pmap(timed_run, range(8), (str(tmp_path), 2), backend=name, bar=False)
    assert caught.value.indices == [2]
    runs = {path.name: [float(t) for t in path.read_text().split()]
            for path in tmp_path.iterdir()}
    killer_runs = sorted(times for run, times in runs.items() if run.startswith("2-"))
    assert len(killer_runs) == 2
    (start, end) = killer_runs[1]
    beside = [run for run, (other_start, other_end) in runs.items()
              if not run.startswith("2-") and other_start < end and other_end > start]
    assert not beside, f"ran beside the killer's second run: {beside}"
    cluster_addresses(name)  # the cluster is whole again, and the jobs that waited are gone:
    assert pmap(abs, [-1, -2, -3], backend=name, bar=False) == [1, 2, 3]


# -- cancelling on the cluster --------------------------------------------------------------


@pytest.mark.backend("dask")
def test_closing_a_gmap_cancels_its_tasks_on_the_dask_cluster(tmp_path):
    cluster = DaskCluster.start(tmp_path, n_workers=2)
    try:
        with parfor.config(backends={"dask": {"address": cluster.address}}):
            results = gmap(long_unless_zero, range(100), bar=False, backend="dask")
            assert next(results) == 0
            assert len(_dask_tasks(cluster)) >= 2  # the next tasks, of 30 s, are on the cluster
            results.close()  # long before any of them could have finished
        _wait_until(lambda: not _dask_tasks(cluster), "the tasks being forgotten", timeout=5)
    finally:
        registry.shutdown()
        cluster.stop()


@pytest.mark.backend("ray")
def test_closing_a_gmap_on_ray_runs_no_more_than_the_tasks_already_out(cluster_addresses,
                                                                       tmp_path):
    cluster_addresses("ray")
    results = gmap(slow_square, range(100), (1.0, str(tmp_path)), bar=False, backend="ray")
    assert next(results) == 0
    results.close()  # Ray tasks are not cancelled then (see RayBackend._cancel); none is added
    time.sleep(6)  # long enough for the tasks that were out, 2 per CPU, to run
    started = len(os.listdir(tmp_path))
    assert started <= 1 + 2 * 2 * 2  # the first item, and at most the window of chunks
    time.sleep(2)
    assert len(os.listdir(tmp_path)) == started and not RayCluster.worker_pids()


@pytest.mark.parametrize("name", CLUSTER_NAMES)
def test_a_call_collected_while_its_backend_holds_its_lock_does_not_hang(name, cluster_addresses):
    """A garbage collection runs a call's finalizer in whatever thread it starts in, maybe one
    that holds the backend's lock (seen: a free-threaded CI run hung there for 120 s)."""
    backend = registry.get_class(name)(address=cluster_addresses(name))
    call = Call(abs)
    backend._shipment(call)  # shipped to the cluster, with a finalizer that forgets it
    call_id = call.id
    assert call_id in backend._shipped
    cycle: list[object] = [call]
    cycle.append(cycle)  # only a garbage collection frees the call now
    del call, cycle

    def collect_holding_the_lock() -> None:
        with backend._lock:
            gc.collect()

    collector = threading.Thread(target=collect_holding_the_lock, daemon=True)
    collector.start()
    collector.join(10)
    assert not collector.is_alive(), "the finalizer waits for the lock its own thread holds"
    assert call_id not in backend._shipped
    backend.shutdown()


# -- without the extra ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "module"), [("dask", "distributed"), ("ray", "ray")])
def test_without_the_extra_the_backend_says_how_to_install_it(name, module):
    program = textwrap.dedent(f"""
        import sys
        sys.modules[{module!r}] = None  # as if the package were not installed
        from parfor import pmap, BackendUnavailableError
        from parfor.__main__ import main
        main(["backends"])
        try:
            pmap(abs, range(4), backend={name!r})
        except BackendUnavailableError as error:
            print("ERROR:", error)
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    install = f'pip install "parfor[{name}]"'
    listed = next(line for line in done.stdout.splitlines() if line.split()[:1] == [name])
    assert "unavailable" in listed and install in listed
    assert any(line.startswith("ERROR:") and install in line for line in done.stdout.splitlines())


# -- helpers ------------------------------------------------------------------------------------


def _engine_processes() -> set[int]:
    """Processes of Dask local clusters and Ray instances run from this environment."""
    environment = str(Path(sys.executable).parent.parent)  # not another test run's
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or ())
        if environment in command and any(part in command for part in (
                "_dask_local", "spawn_main", "raylet", "gcs_server")):
            found.add(process.pid)
    return found


def _dask_tasks(cluster: DaskCluster) -> list[str]:
    def ours(dask_scheduler) -> list[str]:
        return [str(key) for key in dask_scheduler.tasks if "_execute" in str(key)]

    cluster.wait_for_workers()
    return cluster.client.run_on_scheduler(ours)


def _wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
