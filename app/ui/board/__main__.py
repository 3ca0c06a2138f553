"""`python -m app.ui.board PROJECT [--annotator NAME] [--pool ID]`: the naming board on its own."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.ui.board", description=__doc__)
    parser.add_argument("project")
    parser.add_argument("--annotator")
    parser.add_argument("--pool", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from PySide6.QtWidgets import QApplication

    from app.ui.board import BoardWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = BoardWindow(args.project, annotator=args.annotator, pool_id=args.pool)
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
