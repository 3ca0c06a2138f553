"""Thumbnails drawn lazily on a thread pool and kept in an LRU cache bounded in bytes.

A list model asks `ThumbnailCache.get(key, render)`; a miss returns None at once (the model shows a placeholder)
and queues `render` (a plain function returning a PIL image: file reads, numpy and PIL only, safe off the GUI
thread). When the picture is ready the cache emits `ready(key)` in the GUI thread and the models holding that key
repaint its row. A picture that cannot be drawn (a missing file) is cached as a "broken" tile so it is not retried
on every repaint.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from PySide6.QtCore import QObject, QRunnable, Qt, QThreadPool, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPen, QPixmap

log = logging.getLogger(__name__)


def pil_to_qimage(image: Any) -> QImage:
    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    data = image.tobytes()
    # copy(): the QImage must own its pixels, the bytes object goes away with this frame
    return QImage(data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()


class _Relay(QObject):
    done = Signal(object, object, str)  # key, QImage or None, error


class _Render(QRunnable):
    def __init__(self, key: Hashable, render: Callable[[], Any], relay: _Relay):
        super().__init__()
        self.key = key
        self.render = render
        self.relay = relay

    def run(self) -> None:
        image, error = None, ""
        try:
            image = pil_to_qimage(self.render())
        except Exception as exc:  # a missing or corrupt file becomes a broken tile, never a crash
            error = str(exc)
        try:
            self.relay.done.emit(self.key, image, error)
        except RuntimeError:  # the cache was deleted meanwhile (window closed)
            pass


class ThumbnailCache(QObject):
    ready = Signal(object)  # key

    def __init__(self, parent: QObject | None = None, max_bytes: int = 192 * 2**20, threads: int = 3):
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(max(1, threads))
        self._cache: OrderedDict[Hashable, QPixmap] = OrderedDict()
        self._bytes = 0
        self.max_bytes = max_bytes
        self._pending: set[Hashable] = set()
        self._relay = _Relay(self)
        self._relay.done.connect(self._on_done, Qt.ConnectionType.QueuedConnection)
        self._placeholders: dict[int, QPixmap] = {}
        self.errors: dict[Hashable, str] = {}

    def get(self, key: Hashable, render: Callable[[], Any]) -> QPixmap | None:
        pix = self._cache.get(key)
        if pix is not None:
            self._cache.move_to_end(key)
            return pix
        if key not in self._pending:
            self._pending.add(key)
            self._pool.start(_Render(key, render, self._relay))
        return None

    def cached(self, key: Hashable) -> bool:
        return key in self._cache

    @property
    def pending(self) -> int:
        return len(self._pending)

    def placeholder(self, size: int) -> QPixmap:
        pix = self._placeholders.get(size)
        if pix is None:
            pix = QPixmap(size, size)
            pix.fill(QColor(128, 128, 128, 60))
            self._placeholders[size] = pix
        return pix

    def _broken(self, size: int) -> QPixmap:
        pix = QPixmap(size, size)
        pix.fill(QColor(90, 40, 40))
        p = QPainter(pix)
        p.setPen(QPen(QColor(230, 120, 120), max(1, size // 24)))
        p.drawLine(size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        p.drawLine(3 * size // 4, size // 4, size // 4, 3 * size // 4)
        p.end()
        return pix

    def _on_done(self, key: Hashable, image: QImage | None, error: str) -> None:
        self._pending.discard(key)
        if image is None or image.isNull():
            log.info("thumbnail %s not drawn: %s", key, error)
            self.errors[key] = error
            size = next((k for k in reversed(key) if isinstance(k, int)), 64) if isinstance(key, tuple) else 64
            pix = self._broken(size)
        else:
            pix = QPixmap.fromImage(image)
        self._insert(key, pix)
        self.ready.emit(key)

    def _insert(self, key: Hashable, pix: QPixmap) -> None:
        cost = pix.width() * pix.height() * 4
        old = self._cache.pop(key, None)
        if old is not None:
            self._bytes -= old.width() * old.height() * 4
        self._cache[key] = pix
        self._bytes += cost
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, gone = self._cache.popitem(last=False)
            self._bytes -= gone.width() * gone.height() * 4

    def clear(self) -> None:
        self._cache.clear()
        self._bytes = 0

    def wait(self, msecs: int = 10000) -> bool:
        return self._pool.waitForDone(msecs)

    def shutdown(self) -> None:
        """Drop queued work and wait for the drawings in progress (called when the window closes)."""
        self._pool.clear()
        self._pool.waitForDone(10000)
