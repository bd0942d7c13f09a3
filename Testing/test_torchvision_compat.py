"""torchvision is imported for real first; the pure-torch fallback only follows the known failure, and nothing
aborts. In the project's .venv the builds mismatch (the fallback path); test_environments.py runs this file
under a matched torch/torchvision too."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from clisc.torchvision_compat import nms

SCRIPT = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import clisc
    from clisc.models import loaders
    from clisc import torchvision_compat
    torchvision = torchvision_compat.import_torchvision()
    torchvision_compat.import_torchvision()
    import open_clip, segment_anything, torch
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 9, 10.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    mode = "compiled" if torchvision_compat._fallback_library is None else "fallback"
    print(mode, torchvision.ops.nms(boxes, scores, 0.5).tolist())
""")


def test_import_in_a_fresh_process_warns_once_and_nms_works():
    """In this environment's torchvision build, whichever it is: the fallback only where the compiled operators do
    not load (then one warning), and nms gives the right boxes either way."""
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert run.returncode == 0, run.stderr
    mode, kept = run.stdout.split(maxsplit=1)
    assert kept.strip() == "[3, 2]"
    warnings = run.stderr.count("compiled operators do not load")
    assert warnings == (1 if mode == "fallback" else 0), run.stderr
    assert mode == ("compiled" if plain_import_works() else "fallback")


def test_pure_torch_nms_matches_a_brute_force_reference():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(200, 2, generator=generator) * 100
    boxes = torch.cat([corners, corners + torch.rand(200, 2, generator=generator) * 30 + 1], dim=1)
    scores = torch.rand(200, generator=generator)
    kept = nms(boxes, scores, 0.4).tolist()

    def iou(a, b):
        width = (min(a[2], b[2]) - max(a[0], b[0])).clamp(min=0)
        height = (min(a[3], b[3]) - max(a[1], b[1])).clamp(min=0)
        inter = width * height
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    expected = []
    for i in scores.argsort(descending=True).tolist():
        if all(iou(boxes[i], boxes[j]) <= 0.4 for j in expected):
            expected.append(i)
    assert kept == expected


def plain_import_works() -> bool:
    """Whether a bare ``import torchvision`` works in this environment, with the .pth file's hook (which
    install.sh writes where it does not) taken off ``sys.meta_path`` first."""
    script = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_TorchvisionFinder']; "
              "import torchvision")
    return subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 0


def _run(script: str, env: dict | None = None):
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, encoding="utf-8", errors="replace",
                          timeout=300, env={**os.environ, **(env or {})})


def test_a_failed_import_by_the_user_before_ours_does_not_stop_the_engine():
    """Whatever the build, a user's own `import torchvision` first (failing here where the builds mismatch) must
    leave import_torchvision able to give a working torchvision, and segment_anything importable after it."""
    run = _run("""
        try:
            import torchvision
        except RuntimeError:
            pass
        from clisc.torchvision_compat import import_torchvision
        import torch
        tv = import_torchvision()
        import segment_anything
        print(tv.ops.nms(torch.tensor([[0, 0, 10, 10.], [1, 1, 11, 11.]]), torch.tensor([0.9, 0.8]), 0.5).tolist())
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[0]"


def test_missing_torchvision_is_a_clear_error_not_a_traceback(tmp_path):
    """torchvision absent (its import blocked): EnvironmentProblem saying what to install, torch's version named."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torchvision":
                    raise ModuleNotFoundError("No module named 'torchvision'")
        sys.meta_path.insert(0, Block())
    """))
    run = _run("""
        import torch
        from clisc.errors import EnvironmentProblem
        from clisc.torchvision_compat import import_torchvision
        try:
            import_torchvision()
        except EnvironmentProblem as error:
            print(error)
    """, env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[1]}"})
    assert run.returncode == 0, run.stderr
    assert "torchvision does not import" in run.stdout and "matches torch" in run.stdout


def test_another_import_failure_is_reported_and_never_patched_over(tmp_path):
    """A torchvision that fails for a reason other than its missing operators gets no fallback: a clear error."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('undefined symbol: _ZN3c104cuda9SetDevice')\n")
    run = _run("""
        from clisc.errors import EnvironmentProblem
        from clisc import torchvision_compat
        try:
            torchvision_compat.import_torchvision()
        except EnvironmentProblem as error:
            print(error, torchvision_compat._fallback_library)
    """, env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[1]}"})
    assert run.returncode == 0, run.stderr
    assert "undefined symbol" in run.stdout and run.stdout.strip().endswith("None")


def test_a_users_own_script_imports_torchvision_and_open_clip_through_the_pth_file(tmp_path):
    """The .pth file install.sh writes, in a site folder of a fresh interpreter that has not imported CLISC: the
    script's own `import torchvision` and `import open_clip` work and nms is right, with the fallback only where
    the real import fails (one warning), and nothing defined where it works (under a matched torch, in
    test_environments.py)."""
    from clisc.torchvision_hook import write_pth

    write_pth(tmp_path)
    run = _run(f"""
        import logging, site, sys
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        site.addsitedir({str(tmp_path)!r})
        assert "clisc.torchvision_compat" not in sys.modules and "torch" not in sys.modules
        import open_clip, torchvision, torch
        kept = torchvision.ops.nms(torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30.]]),
                                   torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
        from clisc import torchvision_compat
        print("compiled" if torchvision_compat._fallback_library is None else "fallback", kept)
    """)
    assert run.returncode == 0, run.stderr[-3000:]
    mode, kept = run.stdout.split(maxsplit=1)
    assert kept.strip() == "[0, 2]"
    assert mode == ("compiled" if plain_import_works() else "fallback")
    assert run.stderr.count("compiled operators do not load") == (1 if mode == "fallback" else 0), run.stderr


def test_the_pth_file_leaves_another_import_failure_alone(tmp_path):
    """A torchvision failing for another reason is not patched over by the hook: the user sees its own error."""
    from clisc.torchvision_hook import write_pth

    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('undefined symbol: _ZN3c104cuda9SetDevice')\n")
    (tmp_path / "site").mkdir()
    write_pth(tmp_path / "site")
    run = _run(f"""
        import site
        site.addsitedir({str(tmp_path / "site")!r})
        try:
            import torchvision
        except RuntimeError as error:
            from clisc import torchvision_compat
            print(error, torchvision_compat._fallback_library)
    """, env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[1]}"})
    assert run.returncode == 0, run.stderr
    assert "undefined symbol" in run.stdout and run.stdout.strip().endswith("None")
