"""CLISC outside the project's own .venv: the environments users have.

- Python 3.12 with numpy 2.0.2 (3D Slicer 5.10's) and the newest torch and torchvision that pip resolves for
  `pip install -e .`: the engine imports without the torchvision workaround, its unit tests pass, and a tiny
  `clisc segment` runs end to end.
- A user's venv with CPU torch: installing CLISC (install.sh, then a plain `pip install`) leaves torch as it was;
  before that, an old open_clip gets a clear message rather than a traceback.

The environments are real venvs built with pip, so these tests take minutes and several GB the first time. The
3.12 one (about 6 GB) is kept under $CLISC_TEST_VENVS (default ~/.cache/clisc-test-venvs) until pyproject.toml
changes, then replaced; the torch-keeping one is built afresh each run, since the install is what it tests. What
they cannot show: other platforms (macOS, Windows), CUDA at run time (there is no GPU here), or Slicer's own Python
build.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from clisc.environment import paired_torchvision, release

REPO = Path(__file__).resolve().parents[1]
SLICER_5_10_NUMPY = "2.0.2"
USER_TORCH = "2.13.0"  # the CPU build a user has (on this machine pip takes it from a local wheel)
PIP = ["-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
pytestmark = [pytest.mark.slow, pytest.mark.environments]


def interpreter(version: str) -> str:
    """A Python ``version`` interpreter (PATH, then pyenv's versions), or skip."""
    candidates = [shutil.which(f"python{version}")] + sorted(
        glob.glob(str(Path.home() / f".pyenv/versions/{version}*/bin/python{version}")))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    pytest.skip(f"no Python {version} interpreter on this machine")


def run(python: Path, *args: str, env: dict | None = None, check: bool = True, timeout: int = 1800):
    result = subprocess.run([str(python), *args], capture_output=True, encoding="utf-8", errors="replace", timeout=timeout,
                            env={**os.environ, **(env or {})}, cwd=REPO)
    if check:
        assert result.returncode == 0, f"{' '.join(args)[:200]}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def versions(python: Path) -> dict:
    """Installed distributions of ``python``: normalised name (lower case, '-') -> version."""
    script = ("import importlib.metadata as m, json, re; print(json.dumps({re.sub('[-_.]+', '-', "
              "d.metadata['Name']).lower(): d.version for d in m.distributions()}))")
    return json.loads(run(python, "-c", script).stdout)


def new_venv(base: str, folder: Path) -> Path:
    subprocess.run([base, "-m", "venv", str(folder)], check=True)
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def newest_py312():
    """Python 3.12 + numpy 2.0.2, then `pip install -e .` as pip resolves it with that numpy kept (the venv is
    kept until pyproject.toml changes)."""
    base = interpreter("3.12")
    recipe = (REPO / "pyproject.toml").read_bytes() + SLICER_5_10_NUMPY.encode()
    key = hashlib.sha256(recipe).hexdigest()[:12]
    folder = Path(os.environ.get("CLISC_TEST_VENVS", Path.home() / ".cache" / "clisc-test-venvs")) / f"py312-{key}"
    python = folder / "bin" / "python"
    if not (folder / "complete").is_file():
        for stale in folder.parent.glob("py312-*"):  # 6 GB each (CUDA torch): one is kept, the current one
            shutil.rmtree(stale, ignore_errors=True)
        new_venv(base, folder)
        run(python, *PIP, f"numpy=={SLICER_5_10_NUMPY}")
        # Slicer's numpy is Slicer's: its modules install with it pinned, as CLISCSegment does. Unpinned, pip
        # replaces it (scikit-image's newest tifffile needs numpy>=2.1).
        constraint = folder / "keep-numpy.txt"
        constraint.write_text(f"numpy=={SLICER_5_10_NUMPY}\n")
        run(python, *PIP, "-c", str(constraint), "-e", str(REPO), "pytest")
        (folder / "complete").write_text("built\n")
    return python


def test_newest_torch_on_python_312_imports_without_the_workaround(newest_py312):
    installed = versions(newest_py312)
    assert installed["numpy"] == SLICER_5_10_NUMPY
    assert release(installed["torchvision"])[:2] == release(paired_torchvision(installed["torch"]))
    script = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.WARNING)
        from clisc import torchvision_compat
        from clisc.environment import check_environment
        check_environment()
        torchvision = torchvision_compat.import_torchvision()
        import open_clip, segment_anything, timm, monai, torch
        from torchvision.ops import nms
        kept = nms(torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11.]]), torch.tensor([0.9, 0.8]), 0.5).tolist()
        print(sys.version_info[:2], torch.__version__, torchvision.__version__, kept,
              "fallback" if torchvision_compat._fallback_library is not None else "compiled")
    """)
    result = run(newest_py312, "-c", script)
    assert result.stdout.split()[-1] == "compiled", result.stdout
    assert "[0]" in result.stdout and "(3, 12)" in result.stdout
    assert "compiled operators do not load" not in result.stderr
    print(f"tested: {result.stdout.strip()}")


def test_engine_unit_tests_pass_on_python_312_with_numpy_2_0(newest_py312):
    """The engine's own tests (no Slicer, no cohort training) under the other interpreter and numpy."""
    files = ["test_volume_io.py", "test_torchvision_compat.py", "test_prompts.py", "test_metrics.py",
             "test_sam.py", "test_models.py", "test_download.py", "test_environment_check.py"]
    result = run(newest_py312, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 *[str(REPO / "Testing" / name) for name in files], check=False)
    assert result.returncode == 0, result.stdout[-5000:]


def test_tiny_clisc_segment_runs_with_the_newest_torch(newest_py312, tmp_path):
    script = textwrap.dedent(f"""
        import numpy as np, SimpleITK as sitk
        from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, save_random_sam
        volume = np.zeros((3, 64, 64), np.float32)
        yy, xx = np.mgrid[:64, :64]
        volume[:, (yy - 30) ** 2 + (xx - 34) ** 2 < 100] = 1.0
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing((0.9, 0.9, 3.0))
        sitk.WriteImage(image, "{tmp_path}/disk.nii.gz")
        save_random_clip("{tmp_path}/clip", TINY_CLIP_CONFIG)
        save_random_sam("{tmp_path}/sam_b.pth")
    """)
    run(newest_py312, "-c", script)
    result = run(newest_py312, "-m", "clisc", "segment", f"{tmp_path}/disk.nii.gz", "--prompt", "bright disk",
                 "-o", f"{tmp_path}/out.seg.nrrd", "--clip", f"{tmp_path}/clip", "--sam", f"{tmp_path}/sam_b.pth",
                 "--preset", "fast", "--slices", "1:1", "--device", "cpu", check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out.seg.nrrd").is_file()
    assert "compiled operators do not load" not in result.stderr


def test_installing_clisc_keeps_the_users_cpu_torch(tmp_path):
    python = new_venv(interpreter("3.11"), tmp_path / "user-venv")
    run(python, *PIP, f"torch=={USER_TORCH}")
    before = versions(python)
    if "+cpu" not in before["torch"]:
        pytest.skip(f"pip found no CPU build of torch {USER_TORCH} here (got {before['torch']})")

    # An old open_clip, before CLISC is installed: one clear message naming it (and what else is missing).
    run(python, *PIP, "--no-deps", "open_clip_torch==2.31.0")
    old = run(python, "-m", "clisc", "models", "list", env={"PYTHONPATH": str(REPO)}, check=False)
    assert old.returncode == 2, old.stderr
    assert "open-clip-torch 2.31.0 is too old: CLISC needs open-clip-torch>=3.0" in old.stderr
    assert "monai is not installed" in old.stderr and "Traceback" not in old.stderr

    venv = {"VIRTUAL_ENV": str(python.parents[1])}
    subprocess.run(["bash", str(REPO / "install.sh")], check=True, env={**os.environ, **venv}, cwd=REPO,
                   capture_output=True, timeout=1800)
    after_install_sh = versions(python)
    run(python, *PIP, str(REPO))  # a plain pip install, as a researcher would do next
    after_pip = versions(python)

    for after in (after_install_sh, after_pip):
        assert after["torch"] == before["torch"]
        assert not [name for name in after if name.startswith("nvidia-")], "no CUDA packages may be pulled"
        assert release(after["torchvision"])[:2] == release(paired_torchvision(before["torch"]))
        assert release(after["open-clip-torch"]) >= (3, 0)
    cuda = run(python, "-c", "import torch; print(torch.version.cuda)").stdout.strip()
    assert cuda == "None", "torch must still be the CPU build"
    # A user's own script imports torchvision and open_clip, whichever torchvision pip could get (install.sh's
    # .pth file where the builds mismatch).
    run(python, "-c", "import open_clip, torchvision, torch; "
                      "torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)")
