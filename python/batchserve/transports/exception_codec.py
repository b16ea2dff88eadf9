"""The one codec for exceptions that cross a process boundary: a request's
error written into its shared-memory slot (``SharedMemoryTransport``) or sent
back through Ray (``RayTransport``).

Wire format (one ``bytes`` object)::

    b"BSX1"            magic and version
    u32, little endian  N, the length of the text
    N bytes             the text, UTF-8: ``"TypeName: message"``
    the rest            the exception pickled (may be empty)

The pickle is cloudpickle's when cloudpickle can be imported (or Ray's copy
of it, once Ray is loaded), so a class defined in the server's ``__main__``
travels by value and keeps its type; plain pickle otherwise. Nothing of it is
kept when the exception does not pickle, or when ``limit`` is given and the
whole would not fit in ``limit`` bytes (a slot's error area is
``_core.SLOT_ERROR_BYTES``); the text then gets at most half the limit, cut
at a character boundary.

Decoding gives back the unpickled exception, or, when there is no pickle or
it does not unpickle here (a class this process cannot import, an
``__init__`` that unpickling cannot call), a ``RuntimeError("the server
raised TypeName: message")``.
"""

from __future__ import annotations

import pickle
import struct
import sys

_MAGIC = b"BSX1"
_HEADER = struct.Struct("<4sI")

_dumps = None


def _pickler():
    """cloudpickle's dumps when there is one to use, else pickle's."""
    global _dumps
    if _dumps is None:
        try:
            import cloudpickle

            _dumps = cloudpickle.dumps
        except ImportError:
            ray = sys.modules.get("ray")  # Ray carries its own, but import it only if loaded
            _dumps = ray.cloudpickle.dumps if ray is not None else pickle.dumps
    return _dumps


def _text_of(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # a __str__ that raises
        return type(exc).__name__


def encode_exception(exc: BaseException, limit: int | None = None) -> bytes:
    """``exc`` in the wire format above, at most ``limit`` bytes when given
    (``limit`` must leave room for the 8-byte header)."""
    text = _text_of(exc).encode("utf-8", "replace")
    if limit is not None:
        if limit < _HEADER.size:
            raise ValueError(f"encode_exception: a limit of {limit} bytes leaves no room")
        room = max(limit // 2 - _HEADER.size, 0)
        if len(text) > room:
            text = text[:room].decode("utf-8", "ignore").encode("utf-8")
    try:
        blob = _pickler()(exc)
    except Exception:
        blob = b""
    if limit is not None and _HEADER.size + len(text) + len(blob) > limit:
        blob = b""
    return _HEADER.pack(_MAGIC, len(text)) + text + blob


def decode_exception(data: bytes) -> BaseException:
    """The exception ``data`` (from :func:`encode_exception`) stands for."""
    data = bytes(data)
    if len(data) < _HEADER.size or data[:4] != _MAGIC:
        return RuntimeError("the server raised an exception that could not be encoded")
    _, length = _HEADER.unpack_from(data)
    end = _HEADER.size + length
    text = data[_HEADER.size:end].decode("utf-8", "replace")
    if len(data) > end:
        try:
            exc = pickle.loads(data[end:])
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            return exc
    return RuntimeError(f"the server raised {text}")
