"""Running the model off the event loop, one request at a time or micro-batched.

Both predictors run the blocking ``run(clips) -> scores`` in ``workers`` threads (at most that many
model calls at once; ``run`` must be safe to call from several threads when ``workers > 1``, as an ONNX
Runtime session is) and return ``(scores, Batch)``. On a CPU, ``workers`` calls of one intra-op thread
each keep the cores busier than one call spread over them: a small model's operators are too short to
split well across threads, and the event loop's own work (HTTP, JSON, validation) then does not wait for
a core (measured in ``benchmarks/serve_load.py``).

:class:`MicroBatcher` queues the clips of concurrent requests: once a worker is free, a batch starts
with the first waiting request and takes every request already waiting and, while another batch is
on the model, every request arriving within ``window_s`` of it, as long as the batch holds at most
``max_clips`` clips (a request larger than that runs alone); then it runs as one model call while
the next batch gathers. With no other batch running a request starts at once: under light load a
wait would only add its length to the latency. While every worker is busy the queue grows, so the
next batch takes what arrived meanwhile. A failed call fails each request of its batch with the same
error; a request whose client went away is dropped from its batch; stopping lets the calls in
progress answer and fails whatever still waits. No request hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Batch:
    """The model call a request's clips were part of."""

    clips: int  # clips in the call
    requests: int  # requests grouped into it
    inference_ms: float  # wall time of the call


Observer = Callable[[Batch], None]
Prepared = tuple[np.ndarray, Any]  # the model's clips (N, 3, T, 25, 2), and whatever the caller adds
Prepare = Callable[[], Prepared]


class Predictor:
    """One model call per request, in one of ``workers`` threads."""

    def __init__(
        self, run: Callable[[np.ndarray], np.ndarray], observe: Observer = lambda b: None, workers: int = 1
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._run, self._observe, self.workers = run, observe, workers
        self._executor: ThreadPoolExecutor | None = None
        self._in_workers = 0  # calls submitted to the workers and not yet returned
        self._count_lock = threading.Lock()  # the count goes down in the worker's thread

    def _timed(self, clips: np.ndarray, requests: int) -> tuple[np.ndarray, Batch]:
        start = time.perf_counter()
        scores = self._run(clips)
        batch = Batch(len(clips), requests, (time.perf_counter() - start) * 1000)
        self._observe(batch)
        return scores, batch

    async def _submit(self, fn: Callable, *args):
        """``fn(*args)`` in one of the workers."""
        if self._executor is None:
            raise RuntimeError("the predictor is not running")
        call = self._executor.submit(fn, *args)
        with self._count_lock:
            self._in_workers += 1
        call.add_done_callback(self._returned)  # when the call returns, even if its caller is gone
        return await asyncio.wrap_future(call)

    def _returned(self, call) -> None:
        with self._count_lock:
            self._in_workers -= 1

    async def _call(self, clips: np.ndarray, requests: int) -> tuple[np.ndarray, Batch]:
        return await self._submit(self._timed, clips, requests)

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="inference")

    async def stop(self) -> None:
        """Wait (off the event loop) for the call in progress; drop the calls not yet started."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    async def predict(self, clips: np.ndarray, inline: bool = False) -> tuple[np.ndarray, Batch]:
        """Scores ``(N, K)`` of ``clips`` ``(N, 3, T, 25, 2)``.

        ``inline``: run the call on the event loop itself when no call is in the workers, saving the
        hand-off to a worker and back; for a lone client's request (:mod:`serving.activity`): the
        loop then has nobody else's work to do meanwhile.
        """
        if inline and self._executor is not None and self._in_workers == 0:
            return self._timed(clips, 1)
        return await self._call(clips, 1)

    async def predict_after(self, prepare: Prepare) -> tuple[Prepared, np.ndarray, Batch]:
        """``prepare()`` -> ``(clips, info)``, then the model on ``clips``; returns ``((clips, info),
        scores, batch)``.

        Both run in the same worker thread: one hand-off from the event loop instead of two (each
        costs a thread wake-up on both sides; the service's overhead at one client is mostly such
        costs). An exception of ``prepare`` is raised here, and no model call is made.
        """

        def work() -> tuple[Prepared, np.ndarray, Batch]:
            prepared = prepare()
            return (prepared, *self._timed(prepared[0], 1))

        return await self._submit(work)


@dataclass
class _Waiting:
    clips: np.ndarray
    future: asyncio.Future


class MicroBatcher(Predictor):
    """Groups the clips of requests arriving within ``window_s`` (while the model is busy) into one call."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        window_s: float,
        max_clips: int,
        observe: Observer = lambda b: None,
        workers: int = 1,
    ):
        super().__init__(run, observe, workers)
        self.window_s, self.max_clips = window_s, max_clips
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._free = asyncio.Semaphore(workers)  # workers not running a batch
        self._running: set[asyncio.Task] = set()

    async def start(self) -> None:
        await super().start()
        self._task = asyncio.create_task(self._serve(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._running):  # the batches in progress get their answers
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._queue.empty():
            self._fail([self._queue.get_nowait()], RuntimeError("the server is shutting down"))
        await super().stop()

    async def predict_after(self, prepare: Prepare) -> tuple[Prepared, np.ndarray, Batch]:
        """As :meth:`Predictor.predict_after`; ``prepare`` runs in a thread of its own, so that the
        clips can wait in the queue for the requests they are batched with."""
        prepared = await asyncio.to_thread(prepare)
        return (prepared, *await self.predict(prepared[0]))

    async def predict(self, clips: np.ndarray, inline: bool = False) -> tuple[np.ndarray, Batch]:
        """As :meth:`Predictor.predict`; ``inline`` is not used: the batch decides where it runs."""
        if self._task is None or self._task.done():
            raise RuntimeError("the micro-batcher is not running")
        waiting = _Waiting(clips, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(waiting)
        return await waiting.future

    async def _gather(self, batch: list[_Waiting]) -> _Waiting | None:
        """Add to ``batch`` (its first request in it) the requests that join it within the window;
        return the one that did not fit, which opens the next batch."""
        size = sum(len(w.clips) for w in batch)
        wait = self.window_s if self._running else 0.0  # idle model: a lone request does not wait
        deadline = asyncio.get_running_loop().time() + wait
        while size < self.max_clips:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if size + len(item.clips) > self.max_clips:
                return item
            batch.append(item)
            size += len(item.clips)
        return None

    async def _serve(self) -> None:
        carry: _Waiting | None = None
        while True:
            batch: list[_Waiting] = []  # every request taken from the queue is in here until handed on
            try:
                await self._free.acquire()
                try:
                    batch.append(carry or await self._queue.get())
                    carry = await self._gather(batch)
                except BaseException:
                    self._free.release()
                    raise
            except asyncio.CancelledError:
                self._fail([*batch, *([carry] if carry else [])], RuntimeError("the server is shutting down"))
                raise
            task = asyncio.create_task(self._answer(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _answer(self, batch: list[_Waiting]) -> None:
        """Run one batch in a worker and give each of its requests its scores (or the error)."""
        try:
            live = [w for w in batch if not w.future.done()]  # done: the client went away
            if not live:
                return
            try:
                scores, info = await self._call(np.concatenate([w.clips for w in live]), len(live))
            except Exception as exc:  # the model's failure is every waiting request's answer
                self._fail(live, exc)
                return
            start = 0
            for w in live:
                if not w.future.done():
                    w.future.set_result((scores[start : start + len(w.clips)], info))
                start += len(w.clips)
        finally:
            self._running.discard(asyncio.current_task())  # before the next batch looks at it
            self._free.release()

    @staticmethod
    def _fail(waiting: list[_Waiting], exc: BaseException) -> None:
        for w in waiting:
            if not w.future.done():
                w.future.set_exception(exc)
