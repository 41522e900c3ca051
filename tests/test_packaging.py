"""The project installs under the one namespace stream_run (issue 14): nothing generic lands at
the top of site-packages, where Hugging Face's `kernels` (a transformers dependency) lives."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_installed_under_the_namespace():
    setup = PYPROJECT["tool"]["setuptools"]
    listed = set(setup["packages"])
    mapped = setup["package-dir"]
    assert all(name.startswith("stream_run.") for name in listed | set(mapped))
    found = set()
    for name, folder in mapped.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed


def test_console_scripts_point_into_the_namespace():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) >= {"stream-run", "stream-bench", "stream-eval", "stream-convert",
                            "stream-serve"}
    assert all(target.startswith("stream_run.") for target in scripts.values())


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd[:4]}: {proc.stderr[-2000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_next_to_transformers_and_its_kernels(tmp_path, tiny_model_dir):
    """A regular (wheel) install in a fresh venv beside the newest transformers and Hugging
    Face's `kernels`: both import, and stream-run runs a model there."""
    # built from a copy: setuptools leaves a build/ folder in the tree it builds
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").glob("stream_run-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"stream_run"}

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
                ).stdout.strip()
    # The fresh venv sees this environment's packages behind its own (numpy, torch, ...), so
    # only the project, transformers and kernels are installed into it.
    pathlib.Path(site, "parent_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--upgrade",
          "--upgrade-strategy", "only-if-needed", str(wheel), "transformers", "kernels"])

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import kernels, transformers, stream_run.kernels\n"
             "import transformers.integrations.hub_kernels\n"
             "print(kernels.__file__); print(stream_run.kernels.__file__)")
    out = _run([str(python), "-c", probe], cwd=tmp_path, env=env).stdout.split()
    assert not out[0].startswith(str(ROOT / "kernels")) and "stream_run" not in out[0]
    assert out[1].startswith(os.path.join(site, "stream_run", "kernels"))

    model, _, _ = tiny_model_dir("llama")
    run = _run([str(venv / "bin" / "stream-run"), str(model), "--prompt", "hi",
                "--max-tokens", "4", "--ignore-chat-template"], cwd=tmp_path, env=env)
    assert "Generation:" in run.stderr
