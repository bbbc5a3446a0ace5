"""Nuke 13 bundles Python 3.7: the Nuke-side modules must import and work there, not just on 3.11.

Runs the code under a real Python 3.7 interpreter where one is installed (pyenv's, or python3.7 on
PATH); skipped, saying so, where none is.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def python37() -> str | None:
    """A Python 3.7 that really runs (a pyenv shim on PATH may not).

    pyenv's versions are looked for beside the shim on PATH too, not only under ~/.pyenv: a run
    with another HOME (a clean-machine check) must still find the interpreter CI has.
    """
    on_path = shutil.which("python3.7")
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    if on_path and Path(on_path).parent.name == "shims":
        roots.append(str(Path(on_path).parent.parent))
    candidates = [py for root in roots if root for py in sorted(glob.glob(f"{root}/versions/3.7*/bin/python3.7"))]
    candidates += [p for p in [on_path] if p]
    for py in candidates:
        try:
            ok = subprocess.run([py, "-c", "import sys; assert sys.version_info[:2] == (3, 7)"],
                                capture_output=True, timeout=30).returncode == 0
        except OSError:
            ok = False
        if ok:
            return py
    return None


#: Where Nuke's code starts: everything these import from this repository, lazily or not, must
#: run on Nuke's Python too. The rest is found by following their imports (nuke_side_files).
NUKE_ROOTS = ["nuke_submit/*.py", "nuke_submit/nuke_path/*.py"]


def package_dirs() -> dict[str, Path]:
    """``mlfarm.*`` package -> repository folder, as pyproject's package-dir maps them."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    found = dict(re.findall(r'"(mlfarm(?:\.[A-Za-z_]+)*)" = "([^"]+)"', text))
    return {name: REPO / folder for name, folder in found.items()}


def module_file(name: str, dirs: dict[str, Path]) -> Path | None:
    """The repository file of module ``name`` (a package's __init__.py); None if it is not ours."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        base = dirs.get(".".join(parts[:i]))
        if base is None:
            continue
        path = base.joinpath(*parts[i:])
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None
    return None


def module_name(path: Path, dirs: dict[str, Path]) -> str:
    """The dotted name ``path`` is installed under (the deepest package folder that holds it)."""
    package = max((n for n, d in dirs.items() if d in path.parents), key=lambda n: len(dirs[n].parts))
    parts = [p for p in path.relative_to(dirs[package]).with_suffix("").parts if p != "__init__"]
    return ".".join([package, *parts])


def imported_names(path: Path, dirs: dict[str, Path]) -> set[str]:
    """Every module ``path`` may import, at the top or inside a function, as absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = module_name(path, dirs).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from package import module`
    return names


def nuke_side_files() -> list[Path]:
    """The Nuke-side modules and every repository module they import, followed to the end."""
    dirs = package_dirs()
    todo = [Path(p) for pattern in NUKE_ROOTS for p in glob.glob(str(REPO / pattern))]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path, dirs):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a module runs its packages' __init__ first
                found = module_file(".".join(parts[:i]), dirs)
                if found is not None and found not in seen:
                    todo.append(found)
    return sorted(seen)


def client_chain_files() -> list[str]:
    return [str(p) for p in nuke_side_files()]


SMOKE = textwrap.dedent('''
    import sys, threading
    assert sys.version_info[:2] == (3, 7), sys.version
    import nuke  # the tiny import-only stand-in below
    from mlfarm.nuke_submit import headless, knobs, menu, nuke_ui, plan, results, watch
    from mlfarm.nuke_submit.plan import PlanError
    assert plan.choose_frames("custom", (0, 0), (0, 0), "1001-1010x3") == [1001, 1004, 1007, 1010]
    assert plan.frame_runs([1, 2, 3, 7]) == [(1, 3, 1), (7, 7, 1)]
    try:
        plan.farm_pattern("/p/plate.%V.####.exr")
        raise SystemExit("%V accepted")
    except PlanError as exc:
        assert "stereo" in str(exc)
    out = plan.output_pattern("{shot}/ml/{model}/v{version:03d}/{shot}_{model}_v{version:03d}.####.exr",
                              sys.argv[1], "sh 010 \u00e4", "blur")
    assert out.endswith("v001/sh 010 \u00e4_blur_v001.####.exr"), out
    rs = results.read_settings("j", "blur", "2", out, [5, 7], {"outputs": {"rgba": 4}}, True)
    assert rs.file.endswith("%04d.exr") and (rs.first, rs.last) == (5, 7) and rs.raw
    desc = {"name": "m", "options": [{"name": "mode", "type": "choice", "default": "a", "choices": ["a", "b"]}],
            "buttons": [{"name": "go", "type": "bool", "default": False}]}
    specs = knobs.option_knobs(desc)
    assert knobs.options_from_knobs(specs, {"opt_mode": "b", "opt_go": 1.0}) == {"mode": "b", "go": True}
    got = []
    done = threading.Event()

    class Status:
        class spec:
            id, model = "j", "m"
        state, total, counts, failed_frames, stalled = "done", 1, {"done": 1}, [], 0

    w = watch.JobWatcher("j", lambda: Status, lambda p: (got.append(p), done.set()), interval=0.01)
    w.start()
    assert done.wait(5) and got[0].done == 1
    print("ok")
''')

FAKE_NUKE = "env = {'gui': False}\n"  # Nuke has no nuke.PythonPanel: the panel class is nukescripts'

#: Just enough of `nuke` for Nuke's start-up to run mlfarm's init.py and menu.py.
STARTUP_NUKE = textwrap.dedent('''
    import sys
    commands = []
    class _Menu(object):
        def addMenu(self, name, **kw):
            return self
        def addCommand(self, name, command=None, *a, **kw):
            commands.append(name)
    def menu(name):
        return _Menu()
    def pluginAddPath(path):
        sys.path.insert(0, path)
    def tprint(*values):
        print(*values)
    def addOnScriptLoad(call, *a, **kw):
        pass
    def removeOnScriptLoad(call, *a, **kw):
        pass
''')


def test_nuke_side_modules_parse_as_python_37_everywhere():
    """The grammar check runs where no 3.7 interpreter is (a walrus once reached CI this way)."""
    files = client_chain_files()
    assert len(files) > 15
    refused = []
    for f in files:
        try:
            ast.parse(Path(f).read_text(encoding="utf-8"), f, feature_version=(3, 7))
        except SyntaxError as exc:
            refused.append(f"{Path(f).relative_to(REPO)}:{exc.lineno}: {exc.msg}")
    assert not refused, "\n".join(refused)
    with pytest.raises(SyntaxError, match="3.8"):
        ast.parse("if (x := 1):\n    pass\n", feature_version=(3, 7))


@pytest.mark.skipif(python37() is None, reason="no Python 3.7 interpreter here (Nuke 13's Python)")
def test_nuke_side_modules_compile_and_work_on_python_37(tmp_path):
    py = python37()
    files = client_chain_files()
    assert len(files) > 15
    compile_all = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')\n"
    proc = subprocess.run([py, "-B", "-c", compile_all, *files], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

    # The installed layout, holding only what the Nuke side imports: a module missing from the
    # computed list fails here as it would in Nuke.
    dirs = package_dirs()
    for f in nuke_side_files():
        target = (tmp_path / "site").joinpath(*module_name(f, dirs).split("."))
        target = target / "__init__.py" if f.name == "__init__.py" else target.with_suffix(".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    fake = tmp_path / "fake_nuke"
    fake.mkdir()
    (fake / "nuke.py").write_text(FAKE_NUKE)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(fake)]),
           "PYTHONIOENCODING": "utf-8", "LANG": "C.UTF-8"}
    proc = subprocess.run([py, "-B", "-c", SMOKE, str(tmp_path / "root")], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


CLIENT_ON_NUKE_PYTHON = textwrap.dedent('''
    import json, sys, time
    from mlfarm.client import Farm
    from mlfarm.nuke_submit import plan, results
    heavy = [m for m in ("torch", "numpy", "OpenImageIO") if m in sys.modules]
    farm = Farm()
    catalog = farm.catalog(include_local=False)
    s = farm.settings
    out = plan.output_pattern(s.nuke_output_template, str(s.storage_root), "sh010", "passthrough")
    spec = farm.submit("passthrough", sys.argv[1], out, [1, 2, 3], {}, 2, include_local=False)
    while not farm.status(spec.id).finished:
        time.sleep(0.1)
    p = results.Progress.from_status(farm.status(spec.id))
    print(json.dumps({"version": list(sys.version_info[:2]), "heavy": heavy, "models": sorted(catalog),
                      "output": out, "label": results.progress_label(p)}))
''')


@pytest.mark.skipif(not (os.environ.get("MLFARM_TEST_NUKE_PYTHON") and os.environ.get("MLFARM_TEST_NUKE_SITE")),
                    reason="set MLFARM_TEST_NUKE_PYTHON and MLFARM_TEST_NUKE_SITE (a folder filled as the README's "
                           "Nuke setup says) to submit with Nuke's Python")
def test_the_client_installed_as_the_readme_says_submits_from_another_python(farm, tmp_path):
    """The README's install lines, checked: the client folder alone (no torch, numpy, OIIO) submits a job."""
    from conftest import make_plate

    farm.start_worker()
    plate = make_plate(farm.storage / "plates", range(1, 4))
    env = {k: v for k, v in farm.env.items() if k != "MLFARM_MODELS_PATH"}
    env["PYTHONPATH"] = os.environ["MLFARM_TEST_NUKE_SITE"]
    proc = subprocess.run([os.environ["MLFARM_TEST_NUKE_PYTHON"], "-B", "-c", CLIENT_ON_NUKE_PYTHON, plate],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [] and "passthrough" in got["models"]
    assert got["label"].splitlines()[2] == "3/3 done [done]"
    assert all(os.path.exists(got["output"].replace("####", f"{f:04d}")) for f in (1, 2, 3))

    # Nuke starting with NUKE_PATH=SITE/mlfarm/nuke_submit/nuke_path, nothing else on its path:
    # init.py finds the site it was installed in, menu.py adds the menu.
    fake = tmp_path / "fake_nuke"
    fake.mkdir()
    (fake / "nuke.py").write_text(STARTUP_NUKE)
    nuke_path = Path(os.environ["MLFARM_TEST_NUKE_SITE"]) / "mlfarm" / "nuke_submit" / "nuke_path"
    startup = ("import runpy, nuke\n"
               f"runpy.run_path({str(nuke_path / 'init.py')!r})\n"
               f"runpy.run_path({str(nuke_path / 'menu.py')!r})\n"
               "print(sorted(nuke.commands))\n")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(fake), "HOME": str(tmp_path)}
    proc = subprocess.run([os.environ["MLFARM_TEST_NUKE_PYTHON"], "-B", "-c", startup], capture_output=True,
                          text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(sorted(
        ["Submit selected...", "Refresh results", "Retry failed (selected results)", "Settings..."]))
    print("client ran on Python {}.{}".format(*got["version"]))
