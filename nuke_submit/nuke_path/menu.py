# mlfarm's NUKE_PATH folder: Nuke runs this menu.py in GUI sessions only; it adds the ML Farm menu.
# Whatever goes wrong here (a library missing for Nuke's Python, a bad settings file, a Nuke this
# code does not know) ends in one line on the terminal: Nuke's start-up must go on without the menu.
try:
    import mlfarm.nuke_submit.menu

    mlfarm.nuke_submit.menu.install()
except Exception as exc:
    import nuke

    nuke.tprint("mlfarm: ML Farm menu not installed: %s: %s (see 'Nuke setup' in the mlfarm docs)"
                % (type(exc).__name__, str(exc).replace("\n", " ")))
