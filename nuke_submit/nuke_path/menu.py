# mlfarm's NUKE_PATH folder: Nuke runs this menu.py in GUI sessions only; it adds the ML Farm menu.
try:
    import mlfarm.nuke_submit.menu
except ImportError as exc:
    import nuke

    nuke.tprint("mlfarm: ML Farm menu not installed: %s (see 'Nuke setup' in the mlfarm README)" % exc)
else:
    mlfarm.nuke_submit.menu.install()
