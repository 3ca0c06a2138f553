"""The cluster board for interactive naming (Hamidi-Haines et al. 2018): group activation maps into named visual
concepts, describe units, compare annotators. `open_board(project_path, parent)` is what the main window calls."""
from app.ui.board.window import BoardWindow, open_board

__all__ = ["BoardWindow", "open_board"]
