"""ppbridge.freshbuf: frame-sized buffers made without a zero-fill, for the cipher to write."""

from __future__ import annotations

import os
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.trial.unittest import TestCase

from ppbridge import freshbuf


class FreshBufTests(TestCase):
    def test_available_on_cpython(self) -> None:
        """On CPython (what ppbridge runs on) the self-test passes: without it every frame is
        zero-filled again, silently slower. Fails loudly if CPython's layout changes."""
        if sys.implementation.name == "cpython":
            self.assertTrue(freshbuf.AVAILABLE)

    def test_bytearray_size_and_type(self) -> None:
        """fresh_bytearray gives a writable bytearray of the size asked (0 included)."""
        for size in (0, 1, freshbuf.FRESH_MIN - 1, freshbuf.FRESH_MIN, 262184):
            made = freshbuf.fresh_bytearray(size)
            self.assertIs(type(made), bytearray)
            self.assertEqual(len(made), size)
        made = freshbuf.fresh_bytearray(3)
        made[:] = b"abc"
        self.assertEqual(made, b"abc")

    def test_bytes_written_through_view(self) -> None:
        """fresh_bytes: what is written through the view is what the bytes object holds, a real
        ``bytes`` (hashable, equal to its contents), for empty and frame-sized buffers."""
        for data in (b"", b"x", os.urandom(freshbuf.FRESH_MIN), os.urandom(262144)):
            made, view = freshbuf.fresh_bytes(len(data))
            view[:] = data
            result = freshbuf.filled(made, view)
            self.assertIs(type(result), bytes)
            self.assertEqual(result, data)
            self.assertEqual(hash(result), hash(bytes(data)))

    def test_decrypt_into_fresh_bytes(self) -> None:
        """AESGCM.decrypt_into writes a fresh bytes whole: the plaintext comes back intact."""
        key, nonce = AESGCM(os.urandom(32)), os.urandom(12)
        plain = os.urandom(100_000)
        sealed = key.encrypt(nonce, plain, b"ad")
        made, view = freshbuf.fresh_bytes(len(plain))
        key.decrypt_into(nonce, sealed, b"ad", view)
        self.assertEqual(freshbuf.filled(made, view), plain)

    def test_fallback(self) -> None:
        """Where the self-test failed, both functions give ordinary zero-filled buffers that
        work the same way."""
        self.patch(freshbuf, "AVAILABLE", False)
        self.assertEqual(freshbuf.fresh_bytearray(4), bytearray(4))
        for size in (5, freshbuf.FRESH_MIN):
            made, view = freshbuf.fresh_bytes(size)
            view[:] = b"h" * size
            self.assertEqual(freshbuf.filled(made, view), b"h" * size)

    def test_no_type_per_size(self) -> None:
        """The writable view is raw memory, with no ctypes array behind it (ctypes caches an
        array type per length forever: a leak with every frame size a body can have)."""
        if not freshbuf.AVAILABLE:
            self.skipTest("no fresh buffers on this interpreter")
        made, view = freshbuf.fresh_bytes(freshbuf.FRESH_MIN + 7)
        self.assertIsNone(view.obj)
        self.assertEqual((view.nbytes, view.readonly, view.format), (freshbuf.FRESH_MIN + 7, False, "B"))
        view[:] = bytes(len(made))
        self.assertEqual(freshbuf.filled(made, view), bytes(freshbuf.FRESH_MIN + 7))
