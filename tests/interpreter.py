"""A worker process whose Triton runs in the interpreter, for CPU tests of the kernels.

TRITON_INTERPRET=1 only takes effect if it is set before Triton is imported, so the kernels
run in a spawned worker started while the variable is set, whatever this process imported.
"""

import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor


@contextlib.contextmanager
def interpreter_pool() -> Iterator[ProcessPoolExecutor]:
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the worker when it spawns
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(int).result()  # start the worker now, while the variable is set
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    with pool:
        yield pool
