"""Where the tasks of ``vitnp embed`` run, behind one small interface: this process's threads (:class:`ThreadTasks`)
or a Dask cluster (:class:`DaskTasks`). Each hands out tasks (``submit``), reports those that ended (``wait``), tells
which ran too long (``overdue``) and restarts a worker (``restart``); :class:`TimeoutPolicy` says how long is too long.
:func:`vitnp.embed._run_tasks` decides what to run.
"""

import time
import uuid

import numpy as np

from . import threads


class TimeoutPolicy:
    """The shard timeout in seconds: the one given, else (once shards have finished) ``max(FLOOR, FACTOR x their
    median time)``, else None (no shard has finished: nothing to judge by yet)."""

    FLOOR, FACTOR = 60.0, 5.0

    def __init__(self, seconds=None):
        self.given = seconds
        self.times = []

    def record(self, seconds):
        self.times.append(seconds)

    @property
    def seconds(self):
        if self.given is not None:
            return self.given
        return max(self.FLOOR, self.FACTOR * float(np.median(self.times))) if self.times else None


class ThreadTasks:
    """Tasks on this process's threads (``vitnp.get_num_threads()`` at once). A thread cannot be stopped, so there
    are no timeouts here."""

    run = "local"

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.size = threads.get_num_threads()
        self.pool = ThreadPoolExecutor(self.size, thread_name_prefix="vitnp-embed")

    def threads(self):
        return self.size

    def submit(self, key, function, *args):
        return self.pool.submit(function, *args)

    def wait(self, handles, seconds):
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(handles, seconds, return_when=FIRST_COMPLETED)
        return [(handle, outcome(handle)) for handle in done]

    def overdue(self, handles, seconds):
        return []

    def cancel(self, handles):
        for handle in handles:
            handle.cancel()

    def close(self):
        """Cancel the tasks not started yet and wait for the running ones."""
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskTasks:
    """Tasks on a Dask cluster: a task's clock starts when the scheduler hands it to a worker (polled)."""

    def __init__(self, client):
        self.client = client
        self.run = uuid.uuid4().hex[:8]
        self.started = {}  # key -> (worker, when first seen processing there)

    def threads(self):
        """The threads of the cluster's workers now (a worker restarting is not counted)."""
        return sum(self.client.nthreads().values())

    def submit(self, key, function, *args):
        return self.client.submit(function, *args, key=key, pure=False)

    def wait(self, handles, seconds):
        from distributed import wait

        if not handles:  # every worker gone for now (restarting): wait for them
            time.sleep(seconds)
            return []
        try:
            done, _ = wait(handles, timeout=seconds, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return []
        finished = [(handle, outcome(handle)) for handle in done]
        for handle in done:
            self.started.pop(handle.key, None)
            handle.release()
        return finished

    def overdue(self, handles, seconds):
        """``[(handle, worker)]`` of the tasks processing on the same worker for over ``seconds``."""
        where = {key: worker for worker, keys in self.client.processing().items() for key in keys}
        now, late = time.perf_counter(), []
        for handle in handles:
            worker = where.get(handle.key)
            if worker is None:
                self.started.pop(handle.key, None)
            elif self.started.get(handle.key, (None,))[0] != worker:
                self.started[handle.key] = worker, now
            elif now - self.started[handle.key][1] > seconds:
                late.append((handle, worker))
        return late

    def restart(self, worker):
        """Kill and restart a worker process through its nanny (a frozen process included)."""
        try:
            self.client.restart_workers([worker], timeout=60, raise_for_error=False)
        except ValueError:  # a worker without a nanny: the task runs again elsewhere all the same
            pass

    def cancel(self, handles):
        for handle in handles:
            self.started.pop(handle.key, None)
        if handles:
            self.client.cancel(handles)

    def close(self):
        """Nothing to do: the tasks left were cancelled, the client and cluster are closed by their owner."""


def outcome(future):
    """A finished future's result, or the exception its task raised (Dask's KilledWorker when its workers died)."""
    try:
        return future.result()
    except Exception as error:
        return error
