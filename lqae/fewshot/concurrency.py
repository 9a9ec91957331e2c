"""Answering episodes or queries several at a time for backends that wait on a server, results in
order: a bounded pool of threads, each calling the backend as one request would be made alone
(the backend's own retries and back-off stay per request)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from lqae.errors import ConfigError

Item = TypeVar("Item")
Result = TypeVar("Result")


def check_concurrency(concurrency: int, backend) -> None:
    """Refuse `--concurrency` a backend cannot take (a local model runs one prompt at a time)."""
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {concurrency}")
    if concurrency > 1 and not backend.concurrent_requests:
        raise ConfigError(
            f"--concurrency {concurrency} needs a backend that answers requests in parallel (openai:MODEL); "
            f"{backend.name} answers one at a time: leave --concurrency at 1"
        )


def in_order(work: Callable[[Item], Result], items: Iterable[Item], concurrency: int = 1) -> Iterator[Result]:
    """work(item) for every item, yielded in the items' order, with at most `concurrency` running
    at once. The first failure, in order, is raised; work not yet started is dropped."""
    if concurrency <= 1:
        yield from map(work, items)
        return
    queue = iter(items)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="lqae-request")
    pending: deque = deque()

    def top_up() -> None:  # a few finished results may wait for a slow one ahead of them
        while len(pending) < 2 * concurrency:
            item = next(queue, _END)
            if item is _END:
                return
            pending.append(pool.submit(work, item))

    try:
        top_up()
        while pending:
            result = pending.popleft().result()
            top_up()
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


_END = object()
