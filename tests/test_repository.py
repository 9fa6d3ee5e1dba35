"""The repository keeps its promises to a fresh clone: CI runs the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.strip() == "```bash":
            inside, current = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(current).strip())
        elif inside:
            current.append(line)
    return blocks


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_commands = [b for b in _bash_blocks(readme) if "pytest" in b]
    assert len(test_commands) == 1, "README must show exactly one test command"
    assert test_commands[0] in (ROOT / ".ci" / "run").read_text()


def test_grn_core_never_imports_comfyui():
    offenders = []
    for path in (ROOT / "grn_core").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import comfy", "from comfy", "import folder_paths", "from folder_paths",
                                    "import server", "from server")):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert not offenders, offenders


def test_pyproject_dependencies_match_requirements():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {d.split(">=")[0].split("==")[0].strip().lower() for d in project["dependencies"]} - {"torch"}
    listed = {
        line.split(">=")[0].split("==")[0].strip().lower()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert declared == listed


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """grn_core modules that ``module`` (file ``path``) imports, anywhere in the file (lazy imports count too):
    ``from .x import y`` names ``x.y`` when that is a module, else ``x``. A script entry point (the body of
    ``if __name__ == "__main__":``) is not an import of the module and is left out."""
    import ast

    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "grn_core"}


def test_grn_core_has_no_import_cycle():
    """Floors import downwards only (shared/docs/DESIGN.md): no two grn_core modules import each other, directly or
    through others — lazy imports inside functions included."""
    modules = {}
    for path in (ROOT / "grn_core").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target in _imports(path, name, set(modules)):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            for nxt in graph[current]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and reaches(b, a))
    assert not cycles, cycles
