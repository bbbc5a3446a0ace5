"""Stand-in for ``nukescripts.panels``: ``PythonPanel`` as Foundry ships it.

A panel holds knobs in the order they were added. ``okButton``/``cancelButton`` start as ``None``;
``showModalDialog`` adds an OK and a Cancel button at the end of the panel when the panel has not
made its own (Nuke then uses those), and ``knobChangedCallback`` (what Nuke calls on every edit)
calls ``knobChanged``, then finishes the dialog when one of the two was pressed. The dialog's answer
is what the test set in ``nuke.modal_answer``: a bool, or a callable that gets the open panel (the
artist's edits while the dialog is up) and returns one.
"""

from __future__ import annotations

import nuke


class PythonPanel:
    def __init__(self, title: str = "", id: str = "", scrollable: bool = True):  # noqa: A002
        self._title = title
        self._id = id
        self._knobs: dict[str, nuke.Knob] = {}
        self._result = None
        self.okButton = None  # noqa: N815 - Nuke's attribute names
        self.cancelButton = None  # noqa: N815

    def addKnob(self, knob: nuke.Knob) -> None:  # noqa: N802
        self._knobs[knob.name()] = knob

    def removeKnob(self, knob: nuke.Knob) -> None:  # noqa: N802
        self._knobs.pop(knob.name(), None)

    def knobs(self) -> dict[str, nuke.Knob]:
        return dict(self._knobs)

    def knobChanged(self, knob: nuke.Knob) -> None:  # noqa: N802
        pass

    def knobChangedCallback(self, knob: nuke.Knob) -> None:  # noqa: N802
        self.knobChanged(knob)
        if knob is self.okButton:
            self.finishModalDialog(True)
        elif knob is self.cancelButton:
            self.finishModalDialog(False)

    def finishModalDialog(self, result: bool) -> None:  # noqa: N802
        self._result = result

    def showModalDialog(self, defaultKnobText: str = "") -> bool:  # noqa: N802, N803
        self._result = None
        if self.okButton is None:
            self.okButton = nuke.Script_Knob("OK")
            self.addKnob(self.okButton)
            self.cancelButton = nuke.Script_Knob("Cancel")
            self.addKnob(self.cancelButton)
        answer = nuke.modal_answer
        answer = answer(self) if callable(answer) else answer
        return bool(answer if self._result is None else self._result)


def registerWidgetAsPanel(widget: str, name: str, id: str, create: bool = False):  # noqa: N802, A002
    raise NotImplementedError("stand-in: docked panels are not modelled")
