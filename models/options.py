"""Option specs: what a model exposes as Nuke knobs and CLI ``--option`` values, and checking them.

A model's description is plain JSON (published to Redis by workers, read by Nuke's Python, sent
by the gateway), so everything here is pure Python that also runs on Nuke's 3.7 interpreter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class OptionError(ValueError):
    """An option value the model does not accept; the message names the model and the option."""


class Choice:
    """A multiple-choice option: the current value and the values it may take."""

    def __init__(self, value: str, choices: Sequence[str]):
        self.choices: tuple[str, ...] = tuple(str(c) for c in choices)
        if str(value) not in self.choices:
            raise ValueError("%r is not one of %s" % (value, ", ".join(self.choices)))
        self.value = str(value)

    def __repr__(self) -> str:
        return "Choice(%r, %r)" % (self.value, self.choices)


def option_type(value: Any) -> str:
    if isinstance(value, Choice):
        return "choice"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    raise TypeError("option values must be bool, int, float, str or Choice, not %s" % type(value).__name__)


def option_spec(name: str, value: Any, value_range: Sequence[float] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "type": option_type(value)}
    if isinstance(value, Choice):
        spec["default"] = value.value
        spec["choices"] = list(value.choices)
    else:
        spec["default"] = value
    if value_range is not None:
        lo, hi = value_range
        spec["min"] = lo
        spec["max"] = hi
    return spec


def coerce(model: str, spec: Mapping[str, Any], value: Any) -> Any:
    """Turn a CLI string or a JSON value into the option's type, or refuse it with a reason."""
    name, kind = spec["name"], spec["type"]

    def refuse(why: str) -> OptionError:
        return OptionError("model %s: option %s=%r %s" % (model, name, value, why))

    if kind == "bool":
        if isinstance(value, bool):
            out: Any = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            out = value.strip().lower() in _TRUE
        elif isinstance(value, int) and value in (0, 1):
            out = bool(value)
        else:
            raise refuse("is not a bool (use true/false)")
    elif kind == "int":
        if isinstance(value, bool):
            raise refuse("is not an int")
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        else:
            try:
                out = int(str(value).strip())
            except ValueError:
                raise refuse("is not an int") from None
    elif kind == "float":
        if isinstance(value, bool):
            raise refuse("is not a number")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise refuse("is not a number") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise refuse("is not a finite number")
    elif kind == "choice":
        if str(value) not in spec["choices"]:
            raise refuse("is not one of: %s" % ", ".join(spec["choices"]))
        out = str(value)
    else:
        if not isinstance(value, str):
            raise refuse("is not a string")
        out = value
    if kind in ("int", "float"):
        if "min" in spec and out < spec["min"]:
            raise refuse("is below the minimum %s" % spec["min"])
        if "max" in spec and out > spec["max"]:
            raise refuse("is above the maximum %s" % spec["max"])
    return out


def validate_options(description: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Check submitted options against a model description; returns the full, typed option set.

    Options not given take the model's defaults, so a job record always says exactly what ran.
    """
    model = description["name"]
    specs = {s["name"]: s for s in list(description.get("options", [])) + list(description.get("buttons", []))}
    unknown = sorted(set(options) - set(specs))
    if unknown:
        known = ", ".join(sorted(specs)) or "none"
        raise OptionError("model %s has no option %s (its options: %s)" % (model, ", ".join(unknown), known))
    out = {name: spec["default"] for name, spec in specs.items()}
    for name, value in options.items():
        out[name] = coerce(model, specs[name], value)
    return out


def parse_option_args(pairs: Sequence[str]) -> dict[str, str]:
    """``["kernel_size=7", "mode=fast"]`` to a dict, refusing malformed pairs."""
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise OptionError("option %r must be NAME=VALUE" % pair)
        name, value = pair.split("=", 1)
        out[name.strip()] = value
    return out


def describe_options(names: Sequence[str], values: Mapping[str, Any],
                     ranges: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    return [option_spec(n, values[n], ranges.get(n)) for n in names]
