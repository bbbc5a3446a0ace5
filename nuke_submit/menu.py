"""The **ML Farm** menu in Nuke's menu bar, and the script-load hook that resumes following jobs;
called from ``menu.py`` on ``NUKE_PATH``."""

from __future__ import annotations

from typing import Any

import nuke

from . import nuke_ui, prompt_node

MENU = "ML Farm"


def install() -> Any:
    """Add the menu (again: Nuke replaces items of the same name, so reloading is harmless)."""
    menu = nuke.menu("Nuke").addMenu(MENU)
    menu.addCommand("Submit selected...", nuke_ui.submit_selected)
    menu.addCommand("Segment objects (SAM 2)...", prompt_node.segment_selected)
    menu.addCommand("Refresh results", nuke_ui.refresh_results_command)
    menu.addCommand("Retry failed (selected results)", nuke_ui.retry_selected_command)
    menu.addCommand("Settings...", nuke_ui.show_settings)
    nuke.removeOnScriptLoad(nuke_ui.refresh_on_script_load)
    nuke.addOnScriptLoad(nuke_ui.refresh_on_script_load)  # results Reads pick their jobs up again
    return menu
