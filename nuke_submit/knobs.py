"""Panel knobs generated from a model's published description, and option values read back.

Pure Python (3.7+): the farm catalog says each option's type, default, range and choices; this
turns that into knob specifications the Nuke layer instantiates one for one, so a new model's
options appear in the panel without touching Nuke code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

#: Option knobs are named with this prefix so they never clash with the panel's own knobs.
PREFIX = "opt_"

#: Option type (as published) -> knob kind the Nuke layer creates.
KNOB_KINDS = {"int": "int", "float": "float", "bool": "bool", "str": "string", "choice": "enum"}


@dataclass(frozen=True)
class KnobSpec:
    kind: str  # int, float, bool, string, enum
    name: str  # knob name (PREFIX + option name)
    option: str  # the model's option name
    label: str
    default: Any
    values: Tuple[str, ...] = ()  # enum choices
    range: Optional[Tuple[float, float]] = None
    button: bool = False  # one of the model's buttons (a bool the model reads as a switch)


def option_knobs(description: Mapping[str, Any]) -> List[KnobSpec]:
    """One knob per option, then one per button, in the order the model declares them."""
    specs = []
    for button, entries in ((False, description.get("options", [])), (True, description.get("buttons", []))):
        for o in entries:
            kind = "bool" if button else KNOB_KINDS.get(o["type"])
            if kind is None:
                raise ValueError("model %s: option %s has unknown type %r"
                                 % (description.get("name"), o["name"], o["type"]))
            rng = (o["min"], o["max"]) if "min" in o and "max" in o else None
            specs.append(KnobSpec(kind=kind, name=PREFIX + o["name"], option=o["name"],
                                  label=o["name"].replace("_", " "), default=o["default"],
                                  values=tuple(o.get("choices", ())), range=rng, button=button))
    return specs


def options_from_knobs(specs: List[KnobSpec], values: Mapping[str, Any]) -> Dict[str, Any]:
    """Option values from the knobs' values (by knob name), typed as the model declares them.

    Nuke's Int_Knob may hand back a float and an Enumeration_Knob its label; both are put right
    here, and the farm client validates ranges and choices before anything is queued.
    """
    out = {}  # type: Dict[str, Any]
    for s in specs:
        if s.name not in values:
            continue
        v = values[s.name]
        if s.kind == "int" and isinstance(v, float) and v.is_integer():
            v = int(v)
        elif s.kind == "bool":
            v = bool(v)
        elif s.kind == "enum":
            v = str(v)
        out[s.option] = v
    return out
