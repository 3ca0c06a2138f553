"""The layering rules of DESIGN.md, checked by import-linter (contracts in pyproject.toml), and what import-linter
cannot see: SQL written as strings outside app/project, and import cycles."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = 4
SOURCE_DIRS = ("app", "labelers", "benchmarks")


def _lint(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache", str(root / "pyproject.toml")], cwd=root, capture_output=True,
                          text=True)


def test_import_contracts_hold():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Contracts: {CONTRACTS} kept, 0 broken" in proc.stdout, proc.stdout


def test_a_violating_import_breaks_each_contract(tmp_path):
    for name in ("app", "labelers"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    violations = {
        "app/export/raw_sql.py": "import sqlite3\n",  # SQL outside app/project
        "app/project/upward.py": "from app.engine import extract\n",  # the store above the engine
        "labelers/uses_app.py": "import app.jobs\n",  # labelers importing app
        "app/engine/widgets.py": "import PySide6\n",  # Qt outside app/ui
    }
    for rel, text in violations.items():
        (tmp_path / rel).write_text(text)
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert f"Contracts: 0 kept, {CONTRACTS} broken" in proc.stdout, proc.stdout
    for module in ("app.export.raw_sql", "app.project.upward", "labelers.uses_app", "app.engine.widgets"):
        assert module in proc.stdout, module


# An SQL statement as this code base writes them: upper-case keywords, then what that statement needs.
SQL = re.compile(r"\b(SELECT\b[\s\S]*\bFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
                 r"CREATE\s+(TABLE|INDEX|TRIGGER|VIEW)|DROP\s+(TABLE|INDEX)|ALTER\s+TABLE|PRAGMA\s+\w+)\b")


def sql_strings(source: str) -> list[tuple[int, str]]:
    """(line, text) of the string literals (f-string parts included) that hold an SQL statement."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
            out.append((node.lineno, node.value))
    return out


def _sources(outside: str = "app/project") -> list[Path]:
    return [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))
            if not p.relative_to(ROOT).as_posix().startswith(outside + "/")]


def test_no_sql_outside_app_project():
    found = [f"{p.relative_to(ROOT)}:{line}: {text[:60]!r}" for p in _sources() for line, text in
             sql_strings(p.read_text(encoding="utf-8"))]
    assert found == [], "SQL belongs in app/project (add a typed method there):\n" + "\n".join(found)


def test_the_sql_scan_finds_what_it_should():
    assert sql_strings('q = "SELECT id FROM runs WHERE kind=?"')
    assert sql_strings('project.conn.execute(f"DELETE FROM labels WHERE run_id IN ({marks})")')
    assert sql_strings('x = ("INSERT INTO groups (pool_id, name)"\n " VALUES (?, ?)")')
    assert sql_strings('"UPDATE runs SET status=? WHERE id=?"')
    assert not sql_strings('print("select a layer from the list, then insert it into the board")')
    assert not sql_strings('help = "Delete the group; its maps go back to the pool"')


def test_nothing_outside_app_project_imports_the_database():
    """The import-linter contract lists app's modules by pattern; this also covers benchmarks and new files."""
    found = []
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{p.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("sqlite3", "sqlite_utils")]
    assert found == []


def test_no_import_cycles():
    import grimp

    graph = grimp.build_graph("app", "labelers", cache_dir=None)
    modules = {m for m in graph.modules if m.split(".")[0] in ("app", "labelers")}
    edges = {m: sorted(d for d in graph.find_modules_directly_imported_by(m) if d in modules) for m in modules}
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1]
    assert cycles == [], cycles


def _strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the import graph is deep enough to hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(edges[v]):
                work.append((v, i + 1))
                w = edges[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            for w in edges[v]:
                if w in on_stack:
                    low[v] = min(low[v], low[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _strongly_connected({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"], ["d"]]


def test_startup_modules_do_not_import_torch():
    """The window and the CLI's --help start fast: torch and transformers load only when a job needs them."""
    code = ("import sys, app.cli, app.jobs, app.project.store, app.workspace, labelers.base; app.cli.build_parser();"
            "print(sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
