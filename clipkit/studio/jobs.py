"""The studio's job queue: model-heavy work (generations, captions, reranks) runs one job at a time on
one worker thread, in the order it was asked for, so two browser tabs never hold two generations'
memory at once. A job waiting says its place; a job running says its step and holds its latest
preview; :meth:`JobQueue.cancel` drops a waiting job at once and stops a running generation within
one denoising step (the pipeline checks ``job.cancelled`` after every step).

Watchers long-poll: :meth:`JobQueue.wait` returns when the job's ``version`` (bumped on every change)
passes the one they saw, or after a timeout.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable

from clipkit.core.errors import Cancelled, ClipkitError

log = logging.getLogger(__name__)

FINISHED = ("done", "failed", "cancelled")


class Job:
    """One unit of work: ``fn(job) -> result`` (JSON-able), run on the queue's worker."""

    def __init__(self, kind: str, label: str, fn: Callable[["Job"], Any]):
        self.id = secrets.token_hex(5)
        self.kind, self.label, self.fn = kind, label, fn
        self.state = "queued"
        self.created, self.started, self.finished = time.time(), None, None
        self.step = self.total = 0
        self.steps_at_cancel: int | None = None      # steps done when cancel was asked
        self.preview: bytes | None = None            # latest preview PNG
        self.preview_info: dict | None = None        # {step, steps, seed, prompt, n}
        self.images: list[dict] = []                 # gallery entries written so far
        self.result: Any = None
        self.error: str | None = None
        self.warnings: list[str] = []
        self.version = 0
        self.cancel_event = threading.Event()
        self.queue: "JobQueue | None" = None

    def cancelled(self) -> bool:
        """The pipeline's ``cancel`` callback."""
        return self.cancel_event.is_set()

    # -- called on the worker -------------------------------------------------------------------
    def update(self, **fields) -> None:
        q = self.queue
        with q.cond if q else _nolock():
            for k, v in fields.items():
                setattr(self, k, v)
            self.version += 1
            if q:
                q.cond.notify_all()

    def to_dict(self, ahead: int | None = None) -> dict:
        d = {"id": self.id, "kind": self.kind, "label": self.label, "state": self.state,
             "ahead": ahead, "place": None if ahead is None else ahead + 1,
             "step": self.step, "total": self.total, "steps_at_cancel": self.steps_at_cancel,
             "created": self.created, "started": self.started, "finished": self.finished,
             "preview": None, "images": self.images, "result": self.result, "error": self.error,
             "warnings": self.warnings, "version": self.version}
        if self.preview is not None:
            d["preview"] = {**(self.preview_info or {}), "url": f"/api/jobs/{self.id}/preview.png?v={self.version}"}
        return d


class _nolock:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _JobLog(logging.Handler):
    """clipkit's warnings logged on the worker while a job runs go to the job (shown on the page)."""

    def __init__(self, job: Job, thread_id: int):
        super().__init__(logging.WARNING)
        self.job, self.thread_id = job, thread_id

    def emit(self, record):
        if record.thread == self.thread_id:
            try:
                self.job.warnings.append(record.getMessage())
            except Exception:          # noqa: BLE001 - a log line never fails a job
                pass


class JobQueue:
    """FIFO of jobs, run one at a time on one worker thread (started at the first job)."""

    def __init__(self, keep: int = 64):
        self.cond = threading.Condition()
        self.pending: deque[Job] = deque()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.running: Job | None = None
        self.keep = keep
        self.closed = False
        self.thread: threading.Thread | None = None

    def submit(self, kind: str, label: str, fn: Callable[[Job], Any]) -> Job:
        job = Job(kind, label, fn)
        job.queue = self
        with self.cond:
            if self.closed:
                raise ClipkitError("the server is stopping")
            self.pending.append(job)
            self.jobs[job.id] = job
            self._trim()
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="clipkit-studio-jobs", daemon=True)
                self.thread.start()
            self.cond.notify_all()
        return job

    def _trim(self) -> None:
        done = [j for j in self.jobs.values() if j.state in FINISHED]
        for j in done[:max(0, len(self.jobs) - self.keep)]:
            del self.jobs[j.id]

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise LookupError(f"no job {str(job_id)[:40]!r} (finished jobs are kept for a while only)")
        return job

    def ahead(self, job: Job) -> int | None:
        """Jobs before ``job`` (the running one included) while it waits; None once it runs."""
        with self.cond:
            if job.state != "queued":
                return None
            try:
                return self.pending.index(job) + (self.running is not None)
            except ValueError:
                return None

    def view(self, job: Job) -> dict:
        with self.cond:
            return job.to_dict(self.ahead(job))

    def status(self) -> dict:
        with self.cond:
            return {"running": self.running.to_dict() if self.running else None,
                    "waiting": [j.to_dict(i + (self.running is not None)) for i, j in enumerate(self.pending)]}

    def cancel(self, job: Job) -> dict:
        with self.cond:
            if job.state == "queued":
                self.pending.remove(job)
                job.state, job.finished = "cancelled", time.time()
                job.error = "cancelled before it started"
            elif job.state == "running" and not job.cancel_event.is_set():
                job.steps_at_cancel = job.step
                job.cancel_event.set()
            job.version += 1
            self.cond.notify_all()
            return job.to_dict(self.ahead(job))

    def wait(self, job: Job, after: int, timeout: float) -> dict:
        """The job once its version passes ``after`` (or it finished), or after ``timeout`` seconds."""
        with self.cond:
            self.cond.wait_for(lambda: job.version > after or job.state in FINISHED, timeout)
            return job.to_dict(self.ahead(job))

    def run(self, kind: str, label: str, fn: Callable[[Job], Any], timeout: float | None = None):
        """Submit and wait for the result (the job's error re-raised as a ClipkitError)."""
        job = self.submit(kind, label, fn)
        with self.cond:
            if not self.cond.wait_for(lambda: job.state in FINISHED, timeout):
                self.cancel(job)
                raise ClipkitError("timed out waiting for the job queue")
        if job.state != "done":
            raise ClipkitError(job.error or job.state)
        return job.result

    def _work(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending or self.closed)
                if not self.pending:
                    return
                job = self.pending.popleft()
                self.running = job
                job.state, job.started = "running", time.time()
                job.version += 1
                self.cond.notify_all()
            handler = _JobLog(job, threading.get_ident())
            logging.getLogger("clipkit").addHandler(handler)
            state, result, error = "done", None, None
            try:
                result = job.fn(job)
            except Cancelled as e:
                state, error = "cancelled", str(e)
            except ClipkitError as e:
                state, error = "failed", str(e)
            except Exception as e:                  # noqa: BLE001 - a job never stops the worker
                log.exception("studio job %s (%s) failed", job.id, job.kind)
                state, error = "failed", f"internal error: {type(e).__name__}: {e}"
            finally:
                logging.getLogger("clipkit").removeHandler(handler)
            with self.cond:
                job.state, job.result, job.error, job.finished = state, result, error, time.time()
                job.version += 1
                self.running = None
                self._trim()
                self.cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, drop the waiting ones, stop the running one (within a step), join the worker."""
        with self.cond:
            self.closed = True
            for j in list(self.pending):
                j.state, j.finished, j.error = "cancelled", time.time(), "the server stopped"
            self.pending.clear()
            if self.running is not None:
                self.running.cancel_event.set()
            self.cond.notify_all()
            thread = self.thread
        if thread is not None:
            thread.join(timeout)
