"""Frame-sized buffers that are not zero-filled first (a workaround, here only).

Every ~256 KiB frame is sealed into a new buffer and opened into another. ``bytearray(n)`` and
``cryptography``'s ``AESGCM.decrypt`` (a ``bytes`` it allocates) both zero-fill that buffer
before the cipher overwrites every byte of it: one needless pass over each frame on each side
(callgrind: ``memset`` from ``bytearray___init__`` and ``AesGcm::decrypt``, about 1 M
instructions per MiB each). CPython's C API makes both without the fill:
``PyByteArray_FromStringAndSize(NULL, n)`` and ``PyBytes_FromStringAndSize(NULL, n)``, whose
contents are uninitialized until the caller writes them, as ``AESGCM.encrypt_into`` /
``decrypt_into`` then do, all of them.

A new ``bytes`` is written through a view of its own storage (``PyMemoryView_FromMemory`` on
``bytes.__basicsize__ - 1`` bytes into the object, where CPython keeps ``ob_sval``; no ctypes
array type, which ctypes would cache per size) before any other code has seen it: what C code
does with that API. Only buffers of :data:`FRESH_MIN` bytes or more are made so: below that
the fill costs less than the calls. Checked against CPython 3.11: :data:`AVAILABLE` is the
result of a self-test at import; elsewhere (PyPy, a changed layout) the functions fall back to
the ordinary zero-filled buffers. tests/test_freshbuf.py fails loudly if the self-test does.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, Callable


FRESH_MIN = 16 * 1024  # smaller buffers are made the ordinary way


def _api(name: str, *argtypes: Any) -> Callable[..., Any] | None:
    if sys.implementation.name != "cpython":
        return None
    function = getattr(ctypes.pythonapi, name, None)
    if function is None:
        return None
    function.restype = ctypes.py_object
    function.argtypes = argtypes or (ctypes.c_void_p, ctypes.c_ssize_t)
    return function  # type: ignore[no-any-return]


_new_bytearray = _api("PyByteArray_FromStringAndSize")
_new_bytes = _api("PyBytes_FromStringAndSize")
_memory_view = _api("PyMemoryView_FromMemory", ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PYBUF_WRITE = 0x200
_SVAL = bytes.__basicsize__ - 1  # offset of a bytes object's contents


def _writable(data: bytes) -> memoryview:
    """A writable view of a new ``bytes`` object's contents (see the module docstring). It
    does not keep ``data`` alive: the caller does, until the view is released."""
    if _memory_view is None:
        raise RuntimeError("PyMemoryView_FromMemory is not available")
    view: memoryview = _memory_view(id(data) + _SVAL, len(data), _PYBUF_WRITE)
    return view


def fresh_bytearray(size: int) -> bytearray:
    """A bytearray of ``size`` bytes whose contents are unspecified: overwrite all of them."""
    if not AVAILABLE or size < FRESH_MIN:
        return bytearray(size)
    made: bytearray = _new_bytearray(None, size)  # type: ignore[misc]
    return made


def fresh_bytes(size: int) -> tuple[bytes, memoryview]:
    """A ``bytes`` of ``size`` bytes and a writable view of it, through which the caller must
    write every byte before the ``bytes`` is used (or drop both), then release the view
    (:func:`filled`); the ``bytes`` must be kept until then."""
    if not AVAILABLE or size < FRESH_MIN:
        buffer = bytearray(size)
        return b"", memoryview(buffer)  # the caller's fallback: see :func:`filled`
    made: bytes = _new_bytes(None, size)  # type: ignore[misc]
    return made, _writable(made)


def filled(made: bytes, view: memoryview) -> bytes:
    """The ``bytes`` :func:`fresh_bytes` gave, once written (a copy of the view on the fallback)."""
    if len(made) == len(view):
        view.release()
        return made
    return view.tobytes()


def _self_test() -> bool:
    if _new_bytes is None or _new_bytearray is None or _memory_view is None:
        return False
    try:
        made: bytes = _new_bytes(None, 4)
        view = _writable(made)
        view[:] = b"ok!\n"
        view.release()
        grown: bytearray = _new_bytearray(None, 3)
        return made == b"ok!\n" and type(made) is bytes and len(grown) == 3 and type(grown) is bytearray
    except Exception:
        return False


AVAILABLE = _self_test()
