"""Worker processes that execute an experiment's Dagster runs, one run at a time each, and end with their parent.

Each worker is a spawned process serving run requests over a pipe of its own, so a worker that
dies fails only the run it was executing. Workers end when the command line ends, however it
ends: the kernel kills them when their parent dies (Linux's parent-death signal; elsewhere a
watchdog thread notices the parent is gone), and they sit in a process group of their own, so a
Ctrl-C in the terminal reaches only the parent (the command line, or a notebook's kernel), which
then stops them in order (`Workers.stop`) and says what it canceled. Each worker uses the Dagster
instance it is given, whatever its parent's environment says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from spd_assets.service import memory
from spd_assets.service.runs import RunOutcome, execute_run, unreachable_instance

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
PARENT_WATCH_INTERVAL_S = 0.5
# How often `Workers.run` looks up from waiting on its workers (its `on_tick`).
TICK_S = 0.5


@dataclass(frozen=True)
class RunTask:
    """One run to execute: a job, and the partition (member) for a partitioned one."""

    job_name: str
    partition: str | None
    tags: dict[str, str]
    run_config: dict | None
    asset_selection: tuple[tuple[str, ...], ...] | None = None  # asset key paths: only these assets of the job

    @property
    def label(self) -> str:
        return self.partition or self.job_name


def _die_with_parent(parent_pid: int) -> None:
    """Have this process killed when `parent_pid` ends (however it ends)."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
    if libc is not None and hasattr(libc, "prctl") and libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_WATCH_INTERVAL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _serve(connection, parent_pid: int, log_path: str, home: str) -> None:
    """A worker: execute each run request received, send back its outcome; stop at None or a closed pipe."""
    os.environ["DAGSTER_HOME"] = home  # before the code location is loaded: it reads its experiments from there
    os.setpgid(0, 0)  # out of the terminal's foreground group: Ctrl-C is for the command line to handle
    _die_with_parent(parent_pid)
    handle = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 1)  # Dagster's event log lines go to the run log; the terminal shows progress only
    os.dup2(handle, 2)
    os.close(handle)
    while True:
        try:
            task = connection.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        connection.send(execute_task(task))


def execute_task(task: RunTask) -> RunOutcome:
    """Execute `task`'s run in this process; a run that never started or could not be recorded (an unreachable
    instance, ...) is a failed outcome that says why."""
    try:
        selection = None
        if task.asset_selection is not None:
            from dagster import AssetKey

            selection = [AssetKey(list(path)) for path in task.asset_selection]
        return execute_run(task.job_name, task.partition, task.tags, task.run_config, asset_selection=selection)
    except Exception as error:
        error = unreachable_instance(error) or error
        return RunOutcome(label=task.label, success=False, run_id=None, seconds=0.0,
                          error=f"{type(error).__name__}: {error}")


@contextmanager
def _main_module_left_alone():
    """Start processes without their re-importing the caller's `__main__`, as `spawn` otherwise does.

    A worker needs only this package, and re-importing `__main__` would run a script without an
    `if __name__ == "__main__":` guard a second time in every worker (starting the experiment again), and
    fails outright for a script read from standard input (`python - < script.py`: there is no file).
    multiprocessing imports `__main__` in the child only where it has a module name or a file.
    """
    main = sys.modules["__main__"]
    hidden = {name: main.__dict__.pop(name) for name in ("__file__",) if name in main.__dict__}
    spec = getattr(main, "__spec__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(hidden)
        main.__spec__ = spec


class _Worker:
    def __init__(self, context, log_path: str, home: str) -> None:
        self.connection, child_end = context.Pipe(duplex=True)
        self.process = context.Process(target=_serve, args=(child_end, os.getpid(), log_path, home))
        with _main_module_left_alone():
            self.process.start()
        child_end.close()
        self.task: RunTask | None = None
        self.started = 0.0
        self.oom_kills_before: int | None = None
        self.peak_bytes: int | None = None

    def assign(self, task: RunTask) -> None:
        self.task, self.started = task, time.perf_counter()
        self.oom_kills_before = memory.oom_kills()
        self.connection.send(task)

    def sample_memory(self) -> None:
        """Remember the most this worker has held (it cannot be read once the kernel has killed it)."""
        self.peak_bytes = memory.peak_resident_bytes(self.process.pid) or self.peak_bytes

    def death(self) -> str:
        """How the worker ended, in words: out of memory when the kernel's out-of-memory killer ended it."""
        self.process.join(timeout=5)
        code = self.process.exitcode
        pid = self.process.pid
        if code == -signal.SIGKILL and self._killed_for_memory():
            held = f" after holding {self.peak_bytes / 2**30:.1f} GiB" if self.peak_bytes else ""
            available = memory.available_bytes()
            free = f" ({available / 2**30:.1f} GiB is available now)" if available is not None else ""
            return (f"worker process {pid} ran out of memory: the kernel's out-of-memory killer ended it (SIGKILL)"
                    f"{held}{free}; run fewer members at once (--parallel), or make each smaller (a smaller "
                    "source.batch_size, fewer components, a higher activation_threshold)")
        if code is not None and code < 0:
            return f"worker process {pid} was killed by {signal.Signals(-code).name}"
        return f"worker process {pid} ended (exit code {code})"

    def _killed_for_memory(self) -> bool:
        after = memory.oom_kills()
        return after is not None and self.oom_kills_before is not None and after > self.oom_kills_before


class Workers:
    """`size` worker processes using the Dagster instance at `home`; `run` executes tasks on them and reports each
    outcome as it comes. Their Dagster event logs go to `log_path`."""

    def __init__(self, size: int, log_path: str, home: str) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._log_path = log_path
        self._home = home
        self._size = size
        self._workers: list[_Worker] = []

    def run(self, tasks: Sequence[RunTask], report: Callable[[RunOutcome], None],
            on_worker_death: Callable[[int], None] = lambda pid: None,
            on_tick: Callable[[], None] = lambda: None) -> list[RunOutcome]:
        """Execute `tasks`, at most `size` at once; a worker that dies fails its task, and another takes its place.
        `on_tick` is called about every `TICK_S` while tasks run (e.g. to show their progress)."""
        pending = deque(tasks)
        outcomes = []
        while len(self._workers) < min(self._size, len(tasks)):
            self._workers.append(_Worker(self._context, self._log_path, self._home))
        while pending or any(worker.task for worker in self._workers):
            for worker in list(self._workers):
                if worker.task is None and pending:
                    task = pending.popleft()
                    try:
                        worker.assign(task)
                    except OSError:  # it died while idle: another takes the task
                        pending.appendleft(task)
                        worker.task = None
                        self._workers.remove(worker)
                        self._workers.append(_Worker(self._context, self._log_path, self._home))
            busy = [worker for worker in self._workers if worker.task is not None]
            if not busy:
                continue  # a worker was replaced before it took its task
            ready = set(multiprocessing.connection.wait(
                [w.connection for w in busy] + [w.process.sentinel for w in busy], timeout=TICK_S))
            for worker in busy:
                worker.sample_memory()
            on_tick()
            for worker in busy:
                if worker.connection not in ready and worker.process.sentinel not in ready:
                    continue
                try:
                    outcome = worker.connection.recv()
                except (EOFError, OSError):  # the worker died mid-run
                    outcome = RunOutcome(label=worker.task.label, success=False, run_id=None,
                                         seconds=time.perf_counter() - worker.started,
                                         error=f"{worker.death()} while running it")
                    on_worker_death(worker.process.pid)
                    self._workers.remove(worker)
                    if pending:
                        self._workers.append(_Worker(self._context, self._log_path, self._home))
                worker.task = None
                outcomes.append(outcome)
                report(outcome)
        return outcomes

    def busy_labels(self) -> list[str]:
        """The labels (members) of the tasks being executed."""
        return [worker.task.label for worker in self._workers if worker.task is not None]

    def busy_pids(self) -> dict[int, str]:
        """pid -> label of the task of every worker executing one."""
        return {worker.process.pid: worker.task.label for worker in self._workers if worker.task is not None}

    def stop(self) -> None:
        """End every worker now (SIGKILL: the kernel releases their device leases) and wait for them."""
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.kill()
        for worker in self._workers:
            worker.process.join()
            worker.connection.close()
        self._workers = []

    def close(self) -> None:
        """Let idle workers finish and exit."""
        for worker in self._workers:
            try:
                worker.connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()
        self._workers = []
