"""The Nuke side against Nuke's documented API: the names it uses, and Nuke's start-up.

The stand-in in tests/nuke_stub may only offer names from nuke_api.py (Foundry's reference), and
mlfarm's Nuke-side modules may only use those: a name Nuke lacks (``nuke.PythonPanel``) fails here,
not in an artist's Nuke. Start-up runs init.py then menu.py from NUKE_PATH in a fresh interpreter,
as Nuke does, for each install route the docs give.
"""

from __future__ import annotations
import __future__

import ast
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STUB = REPO / "tests" / "nuke_stub"
NUKE_PATH = REPO / "nuke_submit" / "nuke_path"
NUKE_SIDE = sorted((REPO / "nuke_submit").glob("*.py")) + sorted(NUKE_PATH.glob("*.py"))
MENU_ITEMS = ["Submit selected...", "Segment objects (SAM 2)...", "Refresh results",
              "Retry failed (selected results)", "Settings..."]


@pytest.fixture
def api(monkeypatch):
    monkeypatch.syspath_prepend(str(STUB))
    import nuke_api

    return nuke_api


def public_names(namespace: dict) -> set[str]:
    """What a module offers: its own public names, not the modules and __future__ features it imported."""
    return {n for n, v in namespace.items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
            and not isinstance(v, __future__._Feature)}


def public_methods(cls: type) -> set[str]:
    return {n for n, v in inspect.getmembers(cls) if not n.startswith("_") and callable(v)}


def undocumented_uses(source: str, api) -> list[tuple[str, int]]:
    """``nuke.X``/``nukescripts.X`` names (attributes and ``from ... import``) that Nuke's API lacks, and
    the stand-in's own helpers, with their line numbers."""
    known = {"nuke": api.NUKE, "nukescripts": api.NUKESCRIPTS, "nukescripts.panels": api.NUKESCRIPTS}
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in known:
            if node.attr not in known[node.value.id]:
                out.append((f"{node.value.id}.{node.attr}", node.lineno))
        elif isinstance(node, ast.Attribute) and node.attr in api.STUB_ONLY_METHODS:
            out.append((f".{node.attr}", node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module in known:
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names if a.name not in known[node.module]]
    return out


def test_the_stand_in_offers_only_names_of_nukes_documented_api(api):
    import nuke
    import nukescripts

    assert public_names(vars(nuke)) - api.NUKE - api.STUB_ONLY == set()
    assert public_names(vars(nukescripts)) - api.NUKESCRIPTS == set()
    assert "PythonPanel" not in vars(nuke)  # Nuke's panel class is nukescripts.PythonPanel
    extra = {}
    for cls in [nuke.Node, nuke.Root, *nuke._NODE_CLASSES.values()]:
        extra[cls.__name__] = public_methods(cls) - api.NODE_METHODS - api.STUB_ONLY_METHODS
    for cls in [nuke.Knob, *nuke._KNOB_CLASSES.values()]:
        extra[cls.__name__] = public_methods(cls) - api.KNOB_METHODS
    for cls in (nuke.Menu, nuke.MenuItem):
        extra[cls.__name__] = public_methods(cls) - api.MENU_METHODS
    extra["PythonPanel"] = public_methods(nukescripts.PythonPanel) - api.PANEL_METHODS
    assert {name: names for name, names in extra.items() if names} == {}


def test_nuke_side_code_uses_only_names_of_nukes_documented_api(api):
    assert len(NUKE_SIDE) >= 9
    found = {str(p.relative_to(REPO)): undocumented_uses(p.read_text(encoding="utf-8"), api) for p in NUKE_SIDE}
    assert {f: uses for f, uses in found.items() if uses} == {}


def test_the_name_check_finds_what_nuke_lacks(api):
    code = textwrap.dedent("""
        import nuke
        from nukescripts import PythonPanel, FancyPanel
        class Panel(nuke.PythonPanel):
            pass
        nuke.message("fine")
        node.pixels(1)
    """)
    assert undocumented_uses(code, api) == [("nukescripts.FancyPanel", 3), ("nuke.PythonPanel", 4), (".pixels", 7)]


# --- start-up, as Nuke runs it -----------------------------------------------------------------
START = textwrap.dedent("""
    import json, sys
    import nuke
    if "--break-menu-bar" in sys.argv:
        def menu(name):
            raise RuntimeError("no menu bar in this session")
        nuke.menu = menu
    nuke.start([p for p in sys.argv[1:] if not p.startswith("--")])
    item = nuke.menu("Nuke").findItem("ML Farm") if "--break-menu-bar" not in sys.argv else None
    print(json.dumps({"items": [i.name() for i in item.items()] if item else None,
                      "printed": nuke.printed, "errors": nuke.startup_errors}))
""")


def start_nuke(tmp_path: Path, nuke_path: list[Path], *flags: str, **env: str) -> dict:
    """A fresh interpreter doing Nuke's start-up with the stand-in; what it showed."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")}
    full_env.update(PYTHONPATH=str(STUB), HOME=str(home), **env)
    proc = subprocess.run([sys.executable, "-c", START, *map(str, nuke_path), *flags], env=full_env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_start_up_from_the_repositorys_nuke_path_adds_the_menu(tmp_path):
    site = tmp_path / "mlfarm-site"
    site.mkdir()
    shown = start_nuke(tmp_path, [NUKE_PATH], MLFARM_NUKE_SITE=str(site))
    assert shown == {"items": MENU_ITEMS, "printed": [], "errors": []}


def test_start_up_from_an_installed_package_and_from_dot_nuke_adds_the_menu(tmp_path):
    # As `pip install --target SITE` lays it out: NUKE_PATH=SITE/mlfarm/nuke_submit/nuke_path.
    site = tmp_path / "site"
    shutil.copytree(REPO / "nuke_submit", site / "mlfarm" / "nuke_submit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shown = start_nuke(tmp_path, [site / "mlfarm" / "nuke_submit" / "nuke_path"])
    assert shown == {"items": MENU_ITEMS, "printed": [], "errors": []}

    # The ~/.nuke route: two lines in the artist's own init.py and menu.py.
    dot_nuke = tmp_path / "home" / ".nuke"
    dot_nuke.mkdir(parents=True)
    (dot_nuke / "init.py").write_text("import os, nuke\n"
                                      "nuke.pluginAddPath(os.path.expanduser('~/.nuke/mlfarm-site'))\n")
    (dot_nuke / "menu.py").write_text("import mlfarm.nuke_submit.menu\nmlfarm.nuke_submit.menu.install()\n")
    (dot_nuke / "mlfarm-site").mkdir()
    assert start_nuke(tmp_path, []) == {"items": MENU_ITEMS, "printed": [], "errors": []}


def test_any_start_up_failure_is_one_readable_line_and_start_up_goes_on(tmp_path):
    site = tmp_path / "mlfarm-site"
    site.mkdir()
    shown = start_nuke(tmp_path, [NUKE_PATH], "--break-menu-bar", MLFARM_NUKE_SITE=str(site))
    assert shown["errors"] == []  # no traceback: Nuke's start-up went on
    assert shown["printed"] == ["mlfarm: ML Farm menu not installed: RuntimeError: no menu bar in this session "
                                "(see 'Nuke setup' in the mlfarm docs)"]

    # The client folder missing: said in one line by init.py; the menu still installs (mlfarm is importable here).
    shown = start_nuke(tmp_path, [NUKE_PATH], MLFARM_NUKE_SITE=str(tmp_path / "nowhere"))
    assert shown["errors"] == [] and shown["items"] == MENU_ITEMS
    assert shown["printed"] == [f"mlfarm: {tmp_path / 'nowhere'} not found; see 'Nuke setup' in the mlfarm docs"]
