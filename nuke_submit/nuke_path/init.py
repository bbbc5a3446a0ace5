# mlfarm's NUKE_PATH folder: Nuke runs this init.py at start-up (GUI and `nuke -t` alike).
# It puts the folder that `pip install --target` filled with mlfarm and its client libraries on
# Nuke's Python path: MLFARM_NUKE_SITE if set; else the folder this file was installed into
# (<site>/mlfarm/nuke_submit/nuke_path); else ~/.nuke/mlfarm-site. It has to be found before
# mlfarm's settings can be imported, so it is the one thing read from the environment here.
import os

import nuke


def _mlfarm_site():
    if os.environ.get("MLFARM_NUKE_SITE"):
        return os.path.expanduser(os.environ["MLFARM_NUKE_SITE"])
    try:
        here = os.path.dirname(os.path.abspath(__file__))
    except NameError:  # run without a file name
        here = ""
    installed = os.path.dirname(os.path.dirname(os.path.dirname(here))) if here else ""
    if installed and os.path.isfile(os.path.join(installed, "mlfarm", "nuke_submit", "nuke_ui.py")):
        return installed
    return os.path.expanduser("~/.nuke/mlfarm-site")


try:
    _site = _mlfarm_site()
    if os.path.isdir(_site):
        nuke.pluginAddPath(_site)
    else:
        nuke.tprint("mlfarm: %s not found; see 'Nuke setup' in the mlfarm docs" % _site)
except Exception as _exc:  # one readable line; Nuke's start-up goes on
    nuke.tprint("mlfarm: not set up: %s: %s" % (type(_exc).__name__, _exc))
