"""Light and dark appearance (following the system unless the user picks one), and icons from qtawesome, which
ships its icon fonts (nothing is downloaded; superqt's QIconifyIcon would fetch icons from the internet)."""
from __future__ import annotations

import logging
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QColor, QIcon, QPalette
from PySide6.QtWidgets import QApplication

log = logging.getLogger(__name__)

ICONS = {
    "new": "mdi6.folder-plus-outline",
    "open": "mdi6.folder-open-outline",
    "recent": "mdi6.history",
    "model": "mdi6.brain",
    "dataset": "mdi6.image-multiple-outline",
    "extract": "mdi6.play-circle-outline",
    "label": "mdi6.tag-text-outline",
    "cancel": "mdi6.close-circle-outline",
    "resume": "mdi6.restart",
    "gpu": "mdi6.chip",
    "cpu": "mdi6.cpu-64-bit",
    "search": "mdi6.magnify",
    "previous": "mdi6.chevron-left",
    "next": "mdi6.chevron-right",
    "done": "mdi6.check-circle",
    "failed": "mdi6.alert-circle",
    "queued": "mdi6.timer-sand",
    "running": "mdi6.progress-clock",
    "cancelled": "mdi6.cancel",
    "layers": "mdi6.layers-outline",
    "overview": "mdi6.chart-bar",
    "units": "mdi6.table",
    "clear": "mdi6.delete-sweep-outline",
    "appearance": "mdi6.theme-light-dark",
    "quit": "mdi6.exit-to-app",
    "about": "mdi6.information-outline",
    "extracted": "mdi6.checkbox-marked-circle-outline",
    "app": "mdi6.cube-outline",
    "board": "mdi6.view-grid-plus-outline",
    "export": "mdi6.export",
}

# Status colours that read on both backgrounds.
STATE_COLORS = {"done": "#2e9d57", "failed": "#d64545", "cancelled": "#a0781e", "running": "#2f7fd8",
                "queued": "#8a8a8a", "interrupted": "#a0781e"}


def dark_palette() -> QPalette:
    p = QPalette()
    base, alt, window, text = QColor(30, 31, 34), QColor(40, 42, 46), QColor(43, 45, 49), QColor(222, 224, 228)
    disabled = QColor(120, 122, 128)
    highlight = QColor(53, 116, 240)
    for role, color in (
        (QPalette.ColorRole.Window, window), (QPalette.ColorRole.WindowText, text),
        (QPalette.ColorRole.Base, base), (QPalette.ColorRole.AlternateBase, alt),
        (QPalette.ColorRole.ToolTipBase, QColor(55, 57, 62)), (QPalette.ColorRole.ToolTipText, text),
        (QPalette.ColorRole.PlaceholderText, disabled), (QPalette.ColorRole.Text, text),
        (QPalette.ColorRole.Button, QColor(52, 54, 59)), (QPalette.ColorRole.ButtonText, text),
        (QPalette.ColorRole.BrightText, QColor(255, 90, 90)), (QPalette.ColorRole.Link, QColor(110, 160, 255)),
        (QPalette.ColorRole.Highlight, highlight), (QPalette.ColorRole.HighlightedText, QColor(255, 255, 255)),
        (QPalette.ColorRole.Light, QColor(70, 72, 78)), (QPalette.ColorRole.Midlight, QColor(60, 62, 67)),
        (QPalette.ColorRole.Mid, QColor(48, 50, 54)), (QPalette.ColorRole.Dark, QColor(22, 23, 25)),
        (QPalette.ColorRole.Shadow, QColor(10, 10, 10)),
    ):
        p.setColor(role, color)
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.WindowText, QPalette.ColorRole.ButtonText):
        p.setColor(QPalette.ColorGroup.Disabled, role, disabled)
    return p


def light_palette() -> QPalette:
    p = QPalette()
    for role, color in (
        (QPalette.ColorRole.Window, QColor(244, 245, 247)), (QPalette.ColorRole.WindowText, QColor(28, 30, 33)),
        (QPalette.ColorRole.Base, QColor(255, 255, 255)), (QPalette.ColorRole.AlternateBase, QColor(246, 247, 249)),
        (QPalette.ColorRole.ToolTipBase, QColor(255, 255, 240)), (QPalette.ColorRole.ToolTipText, QColor(20, 20, 20)),
        (QPalette.ColorRole.PlaceholderText, QColor(140, 140, 145)), (QPalette.ColorRole.Text, QColor(28, 30, 33)),
        (QPalette.ColorRole.Button, QColor(236, 237, 240)), (QPalette.ColorRole.ButtonText, QColor(28, 30, 33)),
        (QPalette.ColorRole.BrightText, QColor(200, 0, 0)), (QPalette.ColorRole.Link, QColor(30, 90, 200)),
        (QPalette.ColorRole.Highlight, QColor(53, 116, 240)),
        (QPalette.ColorRole.HighlightedText, QColor(255, 255, 255)),
        (QPalette.ColorRole.Light, QColor(255, 255, 255)), (QPalette.ColorRole.Midlight, QColor(230, 231, 234)),
        (QPalette.ColorRole.Mid, QColor(200, 201, 205)), (QPalette.ColorRole.Dark, QColor(160, 161, 166)),
        (QPalette.ColorRole.Shadow, QColor(90, 90, 90)),
    ):
        p.setColor(role, color)
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.WindowText, QPalette.ColorRole.ButtonText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor(160, 160, 165))
    return p


def system_is_dark(app: QApplication) -> bool:
    scheme = app.styleHints().colorScheme()
    if scheme == Qt.ColorScheme.Dark:
        return True
    if scheme == Qt.ColorScheme.Light:
        return False
    # Unknown (e.g. offscreen, older desktops): judge by the platform's default window colour.
    return app.style().standardPalette().color(QPalette.ColorRole.Window).lightness() < 128


class Theme(QObject):
    """Applies the appearance to the application and tells views when it changes (plots recolour themselves)."""

    changed = Signal(bool)  # dark

    def __init__(self, app: QApplication, appearance: str = "system"):
        super().__init__(app)
        self.app = app
        self.appearance = appearance
        self.dark = False
        app.setStyle("Fusion")
        app.styleHints().colorSchemeChanged.connect(self._on_system_change)
        self.apply(appearance)

    def _on_system_change(self, *_: object) -> None:
        if self.appearance == "system":
            self.apply("system")

    def apply(self, appearance: str) -> None:
        self.appearance = appearance
        dark = system_is_dark(self.app) if appearance == "system" else appearance == "dark"
        self.dark = dark
        self.app.setPalette(dark_palette() if dark else light_palette())
        import pyqtgraph as pg

        pg.setConfigOptions(background=plot_background(dark), foreground=plot_foreground(dark), antialias=True)
        self.changed.emit(dark)


def plot_background(dark: bool) -> str:
    return "#1e1f22" if dark else "#ffffff"


def plot_foreground(dark: bool) -> str:
    return "#dcdde1" if dark else "#303236"


def style_plot(plot: Any, dark: bool) -> str:
    """Re-colours an existing pyqtgraph PlotWidget (config options only reach plots made later); returns the
    foreground colour for the plot's other text."""
    plot.setBackground(plot_background(dark))
    fg = plot_foreground(dark)
    for axis in ("left", "bottom"):
        ax = plot.getAxis(axis)
        ax.setPen(fg)
        ax.setTextPen(fg)
    return fg


def icon(name: str, color: str | QColor | None = None) -> QIcon:
    """A qtawesome icon in the palette's text colour (so it reads in light and dark)."""
    import qtawesome as qta

    app = QApplication.instance()
    if color is None and app is not None:
        color = app.palette().color(QPalette.ColorRole.WindowText)
    try:
        return qta.icon(ICONS.get(name, name), color=color, color_disabled="#888888")
    except Exception:  # an icon name missing from an older font must not stop the window
        log.warning("icon %s is not available", name)
        return QIcon()
