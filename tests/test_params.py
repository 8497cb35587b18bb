"""The parameter model: every field's normalisation, clamping and rejection."""

import math

import pytest

from lib_seg import ARG_NAMES, INFOTEXT_KEYS, SEGParamError, SEGParams


def test_defaults_match_spec():
    p = SEGParams()
    assert (p.enabled, p.scale, p.sigma, p.branch, p.layers) == (False, 3.0, math.inf, "uncond", "middle")
    assert (p.start, p.end, p.hires, p.hires_scale, p.hires_sigma) == (0.0, 1.0, "same", 3.0, math.inf)


def test_arg_names_are_the_dataclass_fields_in_order():
    from dataclasses import fields

    assert tuple(f.name for f in fields(SEGParams) if f.name != "notes") == ARG_NAMES
    assert ARG_NAMES[:3] == ("enabled", "scale", "sigma")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("inf", math.inf), ("Infinity", math.inf), ("∞", math.inf), (-1, math.inf), ("-1", math.inf),
     (1e6, math.inf), (10000, math.inf), (9999, 9999.0), (10, 10.0), ("2.5", 2.5), (0, 0.0),
     (math.inf, math.inf)],
)  # fmt: skip
def test_sigma_spellings(value, expected):
    assert SEGParams.from_values({"sigma": value}).sigma == expected


def test_other_negative_sigma_is_inf_with_a_note():
    p = SEGParams.from_values({"sigma": -5})
    assert p.sigma == math.inf
    assert any("sigma" in note for note in p.notes)


@pytest.mark.parametrize("name", ["sigma", "hires_sigma", "scale", "hires_scale", "start", "end"])
@pytest.mark.parametrize("bad", [float("nan"), "nan", "abc", [1], {"a": 1}, True])
def test_numbers_reject_bad_values_naming_the_field(name, bad):
    with pytest.raises(SEGParamError) as info:
        SEGParams.from_values({name: bad})
    assert info.value.field == name
    assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("scale", 50, 30.0), ("scale", -2, 0.0), ("hires_scale", 31, 30.0), ("start", -0.5, 0.0),
     ("end", 1.5, 1.0), ("start", "0.25", 0.25)],
)  # fmt: skip
def test_numbers_are_clamped_and_reported(name, value, expected):
    p = SEGParams.from_values({name: value})
    assert getattr(p, name) == expected
    if float(value) != expected:
        assert any(name in note for note in p.notes)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("true", True), ("False", False), ("on", True), ("0", False),
     (1, True), (0, False), ("", False)],
)  # fmt: skip
def test_enabled_accepts_bool_spellings(value, expected):
    assert SEGParams.from_values({"enabled": value}).enabled is expected


@pytest.mark.parametrize("bad", ["maybe", 2, [True], 0.5])
def test_enabled_rejects_other_values(bad):
    with pytest.raises(SEGParamError, match="enabled"):
        SEGParams.from_values({"enabled": bad})


def test_choices():
    assert SEGParams.from_values({"branch": "Conditional"}).branch == "cond"
    assert SEGParams.from_values({"branch": "negative"}).branch == "uncond"
    assert SEGParams.from_values({"hires": "OFF"}).hires == "off"
    for name, bad in (("branch", "both"), ("hires", "sometimes"), ("branch", 1)):
        with pytest.raises(SEGParamError, match=name):
            SEGParams.from_values({name: bad})


def test_layers_normalised_or_rejected():
    assert SEGParams.from_values({"layers": "mid, in 8, in 7"}).layers == "input 7-8, middle"
    with pytest.raises(SEGParamError, match="layers"):
        SEGParams.from_values({"layers": "somewhere"})


def test_unknown_dict_keys_rejected():
    with pytest.raises(SEGParamError, match="sigm"):
        SEGParams.from_values({"sigm": 3})


def test_from_args_positional_and_dict():
    p = SEGParams.from_args([True, 2.0, "10", "cond", "input 8", 0.1, 0.9, "custom", 1.5, -1])
    assert p == SEGParams(True, 2.0, 10.0, "cond", "input 8", 0.1, 0.9, "custom", 1.5, math.inf)
    assert SEGParams.from_args([True]) == SEGParams(enabled=True)
    assert SEGParams.from_args([True, None, None]) == SEGParams(enabled=True)
    named = {"enabled": True, "scale": 3, "sigma": "inf", "branch": "uncond", "layers": "middle",
             "start": 0, "end": 1, "hires": "same", "hires_scale": 3, "hires_sigma": "inf"}  # fmt: skip
    assert SEGParams.from_args([named]) == SEGParams(enabled=True)
    assert SEGParams.from_args([{"enabled": "true", "sigma": 4}, 9, 9]).sigma == 4.0
    with pytest.raises(SEGParamError, match="args"):
        SEGParams.from_args([True] * 11)


def test_infotext_round_trip():
    p = SEGParams(True, 2.5, 10.0, "cond", "input 7-8, middle", 0.1, 0.8, "custom", 1.0, 4.0)
    text = p.to_infotext()
    assert set(text) == set(INFOTEXT_KEYS.values())
    assert SEGParams.from_infotext(text) == p


def test_infotext_only_writes_non_defaults_and_absent_keys_reset():
    p = SEGParams(enabled=True, sigma=10.0)
    assert p.to_infotext() == {"SEG scale": "3", "SEG sigma": "10"}
    restored = SEGParams.from_infotext({"SEG scale": "3", "SEG sigma": "10"})
    assert restored == p
    assert not SEGParams.from_infotext({"Steps": "20"}).enabled


def test_to_args_round_trip():
    p = SEGParams(True, 1.0, math.inf, "cond", "output 1", 0.0, 0.5, "off", 2.0, 7.0)
    assert SEGParams.from_args(p.to_args()) == p


def test_start_not_before_end_is_noted_and_inactive():
    p = SEGParams.from_values({"enabled": True, "start": 0.7, "end": 0.3})
    assert any("start" in note for note in p.notes)
    assert p.for_pass(False) is None


def test_for_pass():
    p = SEGParams(enabled=True, scale=2.0, sigma=5.0, hires="custom", hires_scale=1.0, hires_sigma=math.inf)
    assert p.for_pass(False) == (2.0, 5.0)
    assert p.for_pass(True) == (1.0, math.inf)
    assert SEGParams(enabled=True, hires="off").for_pass(True) is None
    assert SEGParams(enabled=True, hires="same").for_pass(True) == (3.0, math.inf)
    assert SEGParams(enabled=False).for_pass(False) is None
    assert SEGParams(enabled=True, scale=0.0).for_pass(False) is None
    assert SEGParams(enabled=True, sigma=0.1).for_pass(False) is None
