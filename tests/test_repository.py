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
