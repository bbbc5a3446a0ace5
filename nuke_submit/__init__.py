"""Everything that runs inside Nuke; it submits through ``mlfarm.client``, as the CLI does.

Keep imports here light: Nuke's own Python (3.7 and up) imports this package, and never the
worker or torch (``[tool.importlinter]`` in pyproject.toml checks that).

- ``client.py``: deprecated alias of ``mlfarm.client`` for scripts written against it; goes next release.
- Pure, tested without Nuke: ``plan.py`` (frames, patterns, paths, output versions), ``results.py``
  (the results Read's settings, progress label, failures), ``knobs.py`` (option knobs from the
  catalog), ``watch.py`` (polling off Nuke's main thread).
- Touching ``nuke``, kept thin: ``nuke_ui.py`` (panel, ``submit()``, results Read, progress, retry),
  ``menu.py`` (the ML Farm menu), ``headless.py`` (``nuke -t`` entry point), ``nuke_path/`` (the
  folder to add to ``NUKE_PATH``).
"""
