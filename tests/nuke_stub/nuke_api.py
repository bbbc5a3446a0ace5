"""Names of Nuke's documented Python API, for checking both the stand-in and the code it tests.

Taken by hand from Foundry's Python reference ("nuke" and "nukescripts" modules, and the classes
``nuke.Node``, ``nuke.Knob`` with its subclasses, ``nuke.Menu``/``nuke.MenuItem`` and
``nukescripts.PythonPanel``; learn.foundry.com/nuke/developers/latest/pythonreference/) and the
developer guide's "Custom Panels" page. Only names that exist in Nuke 13 to 16 are listed.

Two tests hold to this list (tests/test_nuke_api.py): the stand-in in this folder may only offer
these names (plus the ``STUB_ONLY`` helpers tests drive it with), and mlfarm's Nuke-side modules may
only use these names on ``nuke`` and ``nukescripts``. So a name Nuke does not have, such as
``nuke.PythonPanel`` (the panel class is ``nukescripts.PythonPanel``), fails a test instead of
passing against a stand-in that happened to define it. Add a name here only after finding it in
Foundry's reference.
"""

#: Module-level names of ``nuke``: functions, classes and constants.
NUKE = frozenset("""
    addAfterRender addBeforeRender addKnobChanged addOnCreate addOnDestroy addOnScriptClose addOnScriptLoad
    addOnScriptSave addOnUserCreate removeAfterRender removeBeforeRender removeKnobChanged removeOnCreate
    removeOnDestroy removeOnScriptClose removeOnScriptLoad removeOnScriptSave removeOnUserCreate
    allNodes ask autoplace autoplaceSnap createNode critical debug delete display env error execute
    executeInMainThread executeInMainThreadWithResult expression filename frame getClipname getFilename
    getInput menu message nodes pluginAddPath pluginAppendPath pluginPath root scriptClear scriptName
    scriptOpen scriptSave scriptSaveAs selectedNode selectedNodes tcl thisGroup thisKnob thisNode toNode
    tprint warning
    NUKE_VERSION_MAJOR NUKE_VERSION_MINOR NUKE_VERSION_RELEASE NUKE_VERSION_STRING
    STARTLINE ENDLINE INVISIBLE DISABLED NO_ANIMATION
    Knob Array_Knob BBox_Knob Boolean_Knob Double_Knob Enumeration_Knob EvalString_Knob File_Knob Int_Knob
    Multiline_Eval_String_Knob PyScript_Knob Script_Knob String_Knob Tab_Knob Text_Knob XY_Knob
    Node Group Root Menu MenuItem Panel PanelNode Format Layer
""".split())

#: Module-level names of ``nukescripts`` (``PythonPanel`` lives in ``nukescripts.panels``).
NUKESCRIPTS = frozenset("""
    PythonPanel panels registerPanel registerWidgetAsPanel unregisterPanel restorePanel
""".split())

#: Methods of ``nuke.Node`` (and so of every node class, ``nuke.Root`` included).
NODE_METHODS = frozenset("""
    Class addKnob allKnobs autoplace bbox channels connectInput dependencies dependent error firstFrame
    forceValidate format frameRange fullName getNumKnobs hasError height help hideControlPanel input inputs
    isSelected knob knobs lastFrame maxInputs maxOutputs metadata minInputs name numKnobs optionalInput
    pixelAspect readKnobs redraw removeKnob resetKnobsToDefault running sample screenHeight screenWidth
    selectOnly setInput setName setSelected setTab setXYpos setXpos setYpos showControlPanel showInfo shown
    treeHasError width writeKnobs xpos ypos
""".split())

#: Methods of ``nuke.Knob`` and its subclasses (each subclass adds a few: ``setRange`` on Array_Knob,
#: ``values``/``setValues`` on Enumeration_Knob, ``execute``/``command`` on Script and PyScript knobs).
KNOB_METHODS = frozenset("""
    Class clearAnimated clearFlag critical debug enabled error fromScript fullyQualifiedName getFlag label name
    node setEnabled setFlag setLabel setName setTooltip setValue setVisible toScript tooltip value visible
    warning getValue setRange min max values setValues enumName numValues execute command setCommand
""".split())

#: Methods of ``nuke.Menu`` and ``nuke.MenuItem``.
MENU_METHODS = frozenset("""
    addCommand addMenu addSeparator clearMenu findItem items menu name removeItem
    action icon invoke script setEnabled setIcon setScript setShortcut setVisible shortcut
""".split())

#: Methods of ``nukescripts.PythonPanel``.
PANEL_METHODS = frozenset("""
    accept add addCallback addKnob addToPane cancel close create destroy finishModalDialog height hide
    isEnabled isValid knobChanged knobChangedCallback knobs ok readKnobs reject removeCallback removeKnob
    setEnabled setMaximumSize setMinimumSize setTooltip setVisible show showModal showModalDialog tooltip
    width writeKnobs
""".split())

#: What the stand-in offers tests to drive it (an artist's hands, Nuke's event loop, what it showed).
#: Nuke has none of these, so mlfarm's Nuke-side code must never use them.
STUB_ONLY = frozenset("""
    reset process_events user_sets messages printed executed modal_answer start startup_errors plugin_path
""".split())

#: Methods the stand-in's nodes have for tests only (a node's pixels, which Nuke computes itself).
STUB_ONLY_METHODS = frozenset(["pixels"])
