"""Decrypt Matrix Olm to-device events; every failure gets one precise name and a PostHog `Error` event.

The API is the UniFFI-generated module ``to_device_crypto._ffi`` (loading ``libto_device_crypto.so``
from this directory), re-exported here unchanged. This file is hand-written and adds one thing: an
``atexit`` hook.

Why the hook: listeners and the log sink are called on threads of the Rust library. Once CPython
starts finalizing (after ``atexit`` handlers ran), any thread other than the main one that asks for
the GIL is ended with ``pthread_exit``; when that thread is one of ours, the forced unwind meets
Rust's ``catch_unwind`` and glibc aborts the process ("FATAL: exception not rethrown", exit code
134). The hook runs first: it lets listeners and the log sink receive what is still queued (for at
most ``EXIT_FLUSH_TIMEOUT_MS``), then stops every call from the library into Python for good.
"""

import atexit as _atexit

from . import _ffi
from ._ffi import *  # noqa: F401,F403  (the generated module's __all__)

__all__ = list(_ffi.__all__)

#: At exit, how long listeners and the log sink get to receive what is still queued.
EXIT_FLUSH_TIMEOUT_MS = 2000


def _prepare_for_exit():
    _ffi.prepare_for_exit(EXIT_FLUSH_TIMEOUT_MS)


_atexit.register(_prepare_for_exit)
