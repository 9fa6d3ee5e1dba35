"""Packaging: ``pip install .`` builds a wheel of the library ``grn_core`` (with the built-in tiny model and the
LICENSE) and nothing of the ComfyUI pack; the installed copy runs the CLI on its own; the Comfy Registry fields are set.

The wheel is built from a copy of the repository so that the build's ``build/`` and ``*.egg-info`` never land in the
working tree, and without build isolation (no network): the test environment must have setuptools >= 77
(requirements-test.txt).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_ONLY = ("tests", "grn_nodes", "benchmarks", "web", "workflows", "tools", "docs")

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python >= 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _library_files() -> list[str]:
    """Every file of the library in the working tree, as wheel paths (source files and the tiny model)."""
    files = []
    for path in (REPO / "grn_core").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            relative = path.relative_to(REPO).as_posix()
            if relative.endswith(".py") or relative.startswith("grn_core/assets/tiny/"):
                files.append(relative)
    return sorted(files)


def _source_copy(tmp_path_factory) -> Path:
    import setuptools  # a test requirement (requirements-test.txt)
    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, (f"setuptools {setuptools.__version__} is too old to read pyproject.toml's SPDX license; "
                         "requirements-test.txt should install setuptools>=77")
    source = tmp_path_factory.mktemp("source") / "repo"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", "build", "dist", "*.egg-info", "out"))
    return source


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = _source_copy(tmp_path_factory)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                    "-q", "-w", str(out), str(source)], check=True, timeout=180)
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=180)
    return target


def _run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_holds_the_library_the_tiny_model_and_the_license(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
        assert len(dist_info) == 1, dist_info
        dist_info = dist_info.pop()
        library = _library_files()
        assert "grn_core/__init__.py" in library and "grn_core/assets/tiny/refiner.safetensors" in library
        missing = [name for name in library if name not in names]
        assert not missing, f"library files missing from the wheel: {missing}"
        subpackages = sorted(path.parent.relative_to(REPO).as_posix()
                             for path in (REPO / "grn_core").rglob("__init__.py") if "__pycache__" not in path.parts)
        assert len(subpackages) >= 8 and all(f"{package}/__init__.py" in names for package in subpackages)
        for name in library:
            if name.startswith("grn_core/assets/tiny/"):
                assert archive.getinfo(name).file_size == (REPO / name).stat().st_size, name
        licenses = [name for name in names if re.fullmatch(rf"{re.escape(dist_info)}/(licenses/)?LICENSE", name)]
        assert licenses, sorted(name for name in names if name.startswith(dist_info))
        assert archive.read(licenses[0]).decode() == (REPO / "LICENSE").read_text()
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()

    outside = sorted(name for name in names if not name.startswith(("grn_core/", dist_info + "/")))
    assert not outside, f"the wheel holds files outside grn_core/: {outside}"
    for folder in PACK_ONLY:
        assert not any(name.startswith(f"{folder}/") or f"/{folder}/" in name for name in names), folder
    assert "__init__.py" not in names  # the ComfyUI pack's entry point is not part of the library
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)

    assert "License-Expression: Apache-2.0" in metadata
    assert "Project-URL: Repository, https://github.com/" in metadata
    assert re.search(r"^Requires-Dist: torch>=", metadata, re.MULTILINE)
    assert "grn = grn_core.cli:main" in entry_points


def test_installed_wheel_generates_with_the_tiny_model(installed, tmp_path):
    where = _run_installed(installed, tmp_path, "-c", "import grn_core; print(grn_core.__file__)")
    assert where.returncode == 0, where.stderr
    module = Path(where.stdout.strip()).resolve()
    assert module.is_relative_to(installed.resolve()), f"imported {module}, not the installed copy in {installed}"
    assert not module.is_relative_to(REPO)

    out = tmp_path / "out" / "x.gif"
    out.parent.mkdir()
    run = _run_installed(installed, tmp_path, "-m", "grn_core", "generate", "--model", "tiny", "--prompt",
                         "a red circle moving right", "--frames", "9", "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert out.is_file() and out.stat().st_size > 0
    assert out.with_suffix(".json").is_file()

    script = installed / "bin" / "grn"
    assert script.is_file()
    help_run = _run_installed(installed, tmp_path, str(script), "--help")
    assert help_run.returncode == 0 and "generate" in help_run.stdout, help_run.stdout + help_run.stderr


def test_editable_install(tmp_path_factory, tmp_path):
    """``pip install -e .``: a throwaway venv that sees this environment's packages (torch …) through a .pth file
    imports ``grn_core`` from the source folder (so the tiny model is found there), picks up a module added after the
    install, and has the ``grn`` command."""
    source = _source_copy(tmp_path_factory)
    venv = tmp_path_factory.mktemp("venv") / "editable"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "zz_parent_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
                    "-e", str(source)], check=True, timeout=180, cwd=tmp_path)
    (source / "grn_core" / "_editable_probe.py").write_text("VALUE = 7\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    probe = subprocess.run([str(python), "-c", "import grn_core, grn_core._editable_probe as p; "
                            "print(grn_core.__file__); print(p.VALUE)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    module, value = probe.stdout.split()
    assert Path(module).resolve() == (source / "grn_core" / "__init__.py").resolve() and value == "7"
    run = subprocess.run([str(venv / "bin" / "grn"), "generate", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "--model" in run.stdout, run.stdout + run.stderr


def test_sdist_holds_the_library_and_the_license(tmp_path_factory):
    """What a build from the source distribution (``python -m build``, or pip from an index) starts from."""
    source = _source_copy(tmp_path_factory)
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_sdist(sys.argv[1])", str(out)], cwd=source, check=True, timeout=180,
                   capture_output=True)
    sdists = list(out.glob("*.tar.gz"))
    assert len(sdists) == 1, sdists
    with tarfile.open(sdists[0]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = [name for name in ["LICENSE", "README.md", "pyproject.toml", *_library_files()] if name not in names]
    assert not missing, f"missing from the sdist: {missing}"
    for folder in PACK_ONLY:
        assert not any(name.startswith(f"{folder}/") for name in names), folder
    assert "__init__.py" not in names


def test_registry_metadata():
    config = _pyproject()
    project, comfy = config["project"], config["tool"]["comfy"]
    repository = project["urls"]["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository)
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"]
    assert comfy.get("includes") == []

    icon_prefix = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy["Icon"].startswith(icon_prefix), comfy["Icon"]
    icon = REPO / comfy["Icon"][len(icon_prefix):]
    assert icon.is_file(), icon
    from PIL import Image

    with Image.open(icon) as image:  # the Registry takes SVG, PNG, JPG or GIF up to 800 x 400
        assert image.format in ("PNG", "JPEG", "GIF") and image.width <= 800 and image.height <= 400
