"""Group commit: the appeals that arrive while one transaction is being written share the next.

Each request still waits for the commit that holds its appeal before it answers (an appeal is
durable before its 202); what the requests share is the transaction's fixed cost (``BEGIN
IMMEDIATE``, one statement per table rather than per appeal, the commit) and the write lock,
which on SQLite is otherwise taken in turn by every request thread polling its busy handler.

There is no writer thread: the first request to find nobody writing becomes the writer, writes
what is pending (its own appeal and any that queued behind the previous transaction) and hands
over. Under a light load every transaction holds one appeal and nobody waits for company; under
a burst the batch grows with the queue. ``max_batch`` bounds one transaction's size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Job = TypeVar("Job")


class GroupCommit(Generic[Job]):
    def __init__(self, write: Callable[[list[Job]], None], *, max_batch: int = 64):
        """``write`` writes a batch in one transaction and records each job's outcome on the job
        itself; if it raises, every job of the batch gets the exception."""
        self._write = write
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._handover = threading.Condition(self._lock)
        self._pending: list[Job] = []
        #: jobs written (or failed), by id(), until their requester has looked
        self._finished: dict[int, BaseException | None] = {}
        self._writing = False

    def write(self, job: Job) -> None:
        """Return once ``job`` is committed, in a batch of its own or with others; raise what
        the batch's transaction raised."""
        key = id(job)
        with self._handover:
            self._pending.append(job)
            while key not in self._finished:
                if self._writing:
                    self._handover.wait()
                    continue
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                self._writing = True
                self._lock.release()
                failure: BaseException | None = None
                try:
                    self._write(batch)
                except BaseException as exc:  # noqa: BLE001 - handed to each request of the batch
                    failure = exc
                finally:
                    self._lock.acquire()
                    self._writing = False
                    for done in batch:
                        self._finished[id(done)] = failure
                    self._handover.notify_all()
            failure = self._finished.pop(key)
        if failure is not None:
            raise failure
