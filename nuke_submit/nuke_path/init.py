# mlfarm's NUKE_PATH folder: Nuke runs this init.py at start-up (GUI and `nuke -t` alike).
# It puts the folder that `pip install --target` filled with mlfarm and its client libraries on
# Nuke's Python path. That folder is MLFARM_NUKE_SITE, else ~/.nuke/mlfarm-site; it has to be
# found before mlfarm's settings can be imported, so it is the one thing read from the environment.
import os

import nuke

_site = os.path.expanduser(os.environ.get("MLFARM_NUKE_SITE", "~/.nuke/mlfarm-site"))
if os.path.isdir(_site):
    nuke.pluginAddPath(_site)
else:
    nuke.tprint("mlfarm: %s not found; see 'Nuke setup' in the mlfarm README" % _site)
