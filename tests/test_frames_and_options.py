"""Pure parts: frame ranges, path patterns, option validation, the catalog."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlfarm.broker.celery_app import celery_priority
from mlfarm.frames import PatternError, chunked, format_frames, frame_path, parse_frames, to_printf
from mlfarm.models.catalog import Catalog, UnknownModel, discover
from mlfarm.models.options import OptionError, parse_option_args, validate_options

from conftest import PLUGINS


@pytest.mark.parametrize("text, frames", [
    ("1001-1005", [1001, 1002, 1003, 1004, 1005]),
    ("1001-1009x4", [1001, 1005, 1009]),
    ("1,5,9-11", [1, 5, 9, 10, 11]),
    ("3-5, 4-6", [3, 4, 5, 6]),
    ("-2-1", [-2, -1, 0, 1]),
    ("7", [7]),
])
def test_parse_frames(text, frames):
    assert parse_frames(text) == frames


@pytest.mark.parametrize("text", ["", "a-b", "10-1", "1-10x0", "1--"])
def test_parse_frames_refuses_nonsense(text):
    with pytest.raises(PatternError):
        parse_frames(text)


@pytest.mark.parametrize("frames", [[1, 2, 3], [1, 3, 5, 6], [10, 9, 8], [1001], [1, 2], list(range(1, 100, 7))])
def test_format_frames_round_trips(frames):
    assert parse_frames(format_frames(frames)) == frames


def test_format_frames_is_compact():
    assert format_frames(range(1001, 1101)) == "1001-1100"
    assert format_frames([1, 3, 5, 7]) == "1-7x2"


def test_patterns():
    assert frame_path("/s/a.####.exr", 42) == "/s/a.0042.exr"
    assert frame_path("/s/a.%06d.exr", 42) == "/s/a.000042.exr"
    assert frame_path("/s/a.#.exr", 1001) == "/s/a.1001.exr"
    assert frame_path("/s/my shot é/a_####.exr", 7) == "/s/my shot é/a_0007.exr"
    assert to_printf("/s/a.####.exr") == "/s/a.%04d.exr"
    with pytest.raises(PatternError, match="no frame number"):
        frame_path("/s/a.exr", 1)
    with pytest.raises(PatternError, match="view"):
        frame_path("/s/a.%V.####.exr", 1)
    with pytest.raises(PatternError, match="more than one"):
        frame_path("/s/####/a.####.exr", 1)


def test_chunked():
    assert chunked([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]


def test_priority_mapping_orders_high_priority_first():
    # Redis transport: the lower step is served first.
    assert celery_priority(100) < celery_priority(50) < celery_priority(0)
    assert celery_priority(100) == 0 and celery_priority(0) == 9


@pytest.fixture(scope="module")
def catalog():
    return Catalog(discover([PLUGINS]))


def test_catalog_describes_options_with_types_choices_and_ranges(catalog):
    slow = catalog.describe("slow")
    opts = {o["name"]: o for o in slow["options"]}
    assert opts["seconds"] == {"name": "seconds", "type": "float", "default": 0.5, "min": 0.0, "max": 30.0}
    assert opts["mode"] == {"name": "mode", "type": "choice", "default": "copy", "choices": ["copy", "invert"]}
    assert opts["label"]["type"] == "str"
    assert slow["buttons"] == [{"name": "flag", "type": "bool", "default": False}]
    assert slow["outputs"] == {"rgba": 4, "extra": ["id"]}
    assert slow["device"] == "cpu"
    blur = catalog.describe("blur")
    assert blur["label"] == "Gaussian Blur" and blur["device"] == "gpu"
    assert blur["options"][0]["type"] == "int" and blur["options"][0]["default"] == 5


def test_validate_options_types_and_defaults(catalog):
    desc = catalog.describe("slow")
    got = validate_options(desc, {"seconds": "1.5", "mode": "invert", "flag": "yes", "label": "hello"})
    assert got == {"seconds": 1.5, "gain": 1.0, "mode": "invert", "flag": True, "label": "hello"}
    assert validate_options(catalog.describe("blur"), {"kernel_size": "7"}) == {"kernel_size": 7}


@pytest.mark.parametrize("options, message", [
    ({"kernel": "3"}, "has no option kernel"),
    ({"kernel_size": "3.5"}, "kernel_size='3.5' is not an int"),
    ({"kernel_size": "-1"}, "below the minimum 0"),
    ({"kernel_size": "201"}, "above the maximum 200"),
    ({"kernel_size": True}, "is not an int"),
])
def test_validate_options_refusals_name_the_option(catalog, options, message):
    with pytest.raises(OptionError, match=message):
        validate_options(catalog.describe("blur"), options)


def test_choice_and_bool_refusals(catalog):
    with pytest.raises(OptionError, match="not one of: copy, invert"):
        validate_options(catalog.describe("slow"), {"mode": "blend"})
    with pytest.raises(OptionError, match="not a bool"):
        validate_options(catalog.describe("slow"), {"flag": "maybe"})
    with pytest.raises(OptionError, match="not a finite number"):
        validate_options(catalog.describe("slow"), {"seconds": "nan"})


def test_parse_option_args():
    assert parse_option_args(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(OptionError):
        parse_option_args(["novalue"])


def test_unknown_model(catalog):
    with pytest.raises(UnknownModel, match="unknown model 'nope'.*blur"):
        catalog.describe("nope")


def test_models_folder_overrides_and_broken_plugins_do_not_hide_others(tmp_path):
    good = tmp_path / "blur"
    good.mkdir()
    (good / "__init__.py").write_text("")
    (good / "model.py").write_text(
        "from mlfarm.models import BaseModel\n"
        "class Model(BaseModel):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.name = 'Studio blur'\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "__init__.py").write_text("")
    (broken / "model.py").write_text("raise ImportError('missing studio lib')\n")
    described = Catalog(discover([tmp_path])).describe_all()
    assert described["blur"]["label"] == "Studio blur"
    assert "broken" not in described and "passthrough" in described


def test_listing_the_catalog_imports_no_torch():
    code = ("import sys, json\nfrom mlfarm.models.catalog import Catalog, discover\n"
            "d = Catalog(discover()).describe_all()\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'models': sorted(d)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result == {"torch": False, "models": sorted(result["models"])} and "blur" in result["models"]


def test_options_travel_with_the_work_and_views_of_views_add_up(catalog):
    model = catalog.entry("slow").create()
    a = model.with_options({"seconds": 2.0, "mode": "invert"})
    b = a.with_options({"gain": 3.0})  # a view of a view: both pieces of work's options
    assert (b.seconds, b.mode.value, b.gain) == (2.0, "invert", 3.0)
    assert (a.seconds, a.gain) == (2.0, 1.0) and (model.seconds, model.mode.value, model.gain) == (0.5, "copy", 1.0)
    assert b.with_options({"seconds": 0.5}).seconds == 0.5  # back to the model's value, on top of the view
    assert isinstance(b, type(model))
