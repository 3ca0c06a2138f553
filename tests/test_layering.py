"""The layering rules of DESIGN.md, checked by import-linter (contracts in pyproject.toml)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 2 kept, 0 broken" in proc.stdout, proc.stdout


def test_startup_modules_do_not_import_torch():
    """The window and the CLI's --help start fast: torch and transformers load only when a job needs them."""
    code = ("import sys, app.cli, app.jobs, app.project.store, app.workspace, labelers.base; app.cli.build_parser();"
            "print(sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
