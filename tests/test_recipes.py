"""Recipes: frozen, validated on construction, round trip through plain data."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxquant.recipes import AQLM, GPTQ, RTN, Kashin
from jaxquant.recipes_named import recipe_from_dict, recipe_to_dict


def test_defaults_and_names():
    assert RTN().bits == 4 and RTN().group_size == 128 and not RTN().symmetric
    assert GPTQ().act_order and GPTQ().damp == 0.01 and GPTQ().block_size == 128
    assert AQLM().num_codebooks == 2 and AQLM().codebook_bits == 8 and AQLM().group_size == 8
    assert RTN(bits=2, group_size=None).name == "rtn-2bit-grow"
    assert GPTQ(bits=3).name == "gptq-3bit-g128"
    assert AQLM(num_codebooks=1, codebook_bits=16).name == "aqlm-1x16-g8"


def test_frozen_and_hashable():
    r = GPTQ(bits=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.bits = 2  # type: ignore[misc]
    assert {r: 1}[GPTQ(bits=3)] == 1 and GPTQ(bits=3) != GPTQ(bits=2)


@pytest.mark.parametrize(
    "cls,field,value,exc,message",
    [
        (RTN, "bits", 0, ValueError, r"bits=0 must be in \[1, 8\]"),
        (RTN, "bits", 9, ValueError, r"bits=9 must be in \[1, 8\]"),
        (RTN, "bits", 2.0, TypeError, r"bits=2.0 must be an int"),
        (RTN, "bits", True, TypeError, r"bits=True must be an int"),
        (RTN, "group_size", 0, ValueError, r"group_size=0 must be >= 1"),
        (RTN, "group_size", "128", TypeError, r"group_size='128' must be an int"),
        (RTN, "param_dtype", "int8", ValueError, r"param_dtype='int8' must be one of"),
        (RTN, "symmetric", "yes", TypeError, r"symmetric='yes' must be a bool"),
        (RTN, "clip_search", 1, TypeError, r"clip_search=1 must be a bool"),
        (GPTQ, "damp", 0.0, ValueError, r"damp=0.0 must be > 0"),
        (GPTQ, "damp", -0.1, ValueError, r"damp=-0.1 must be > 0"),
        (GPTQ, "damp", "0.01", TypeError, r"damp='0.01' must be a number"),
        (GPTQ, "block_size", 0, ValueError, r"block_size=0 must be >= 1"),
        (GPTQ, "act_order", None, TypeError, r"act_order=None must be a bool"),
        (GPTQ, "bits", 16, ValueError, r"bits=16 must be in \[1, 8\]"),
        (AQLM, "num_codebooks", 0, ValueError, r"num_codebooks=0 must be >= 1"),
        (AQLM, "codebook_bits", 17, ValueError, r"codebook_bits=17 must be in \[1, 16\]"),
        (AQLM, "group_size", 0, ValueError, r"group_size=0 must be >= 1"),
        (AQLM, "out_group_size", 0, ValueError, r"out_group_size=0 must be >= 1"),
        (AQLM, "beam_size", 0, ValueError, r"beam_size=0 must be >= 1"),
        (AQLM, "lr", 0.0, ValueError, r"lr=0.0 must be > 0"),
        (AQLM, "b1", 1.5, ValueError, r"b1=1.5 must be in \[0.0, 1.0\]"),
        (AQLM, "tolerance", -1.0, ValueError, r"tolerance=-1.0 must be >= 0"),
        (AQLM, "final_refit", 1, TypeError, r"final_refit=1 must be a bool"),
        (AQLM, "param_dtype", "float64", ValueError, r"param_dtype='float64' must be one of"),
    ],
)
def test_validation_names_field_and_value(cls, field, value, exc, message):
    with pytest.raises(exc, match=message):
        cls(**{field: value})


def test_valid_edge_values_are_accepted():
    assert RTN(bits=1, group_size=1).bits == 1
    assert RTN(bits=8, group_size=None, symmetric=True).symmetric
    assert GPTQ(damp=1e-6, block_size=1, act_order=False).damp == 1e-6
    assert AQLM(codebook_bits=16, max_rounds=0, adam_steps=0, b1=0.0, b2=1.0, tolerance=0.0).b2 == 1.0
    assert GPTQ(damp=1).damp == 1  # an int is a number


@pytest.mark.parametrize(
    "recipe",
    [RTN(), RTN(bits=2, group_size=None, symmetric=True, clip_search=True), GPTQ(bits=3, act_order=False),
     AQLM(num_codebooks=1, codebook_bits=16, beam_size=1, lr=3e-4), GPTQ(bits=2, rotate=True),
     Kashin(u_bits=1, v_bits=2, transform="dct")],
)
def test_round_trip_through_json(recipe):
    data = recipe_to_dict(recipe)
    assert data["method"] == type(recipe).__name__.lower()
    assert recipe_from_dict(json.loads(json.dumps(data))) == recipe


def test_from_dict_names_unknown_fields():
    with pytest.raises(TypeError, match=r"unknown GPTQ fields \['bitz', 'groupsize'\].*allowed: .*'bits'"):
        recipe_from_dict({"method": "gptq", "bitz": 3, "groupsize": 64})


def test_from_dict_unknown_or_missing_method():
    with pytest.raises(ValueError, match=r"method='awq' must be one of \['aqlm', 'gptq', 'kashin', 'pvq', 'rtn'"):
        recipe_from_dict({"method": "awq"})
    with pytest.raises(ValueError, match="method=''"):
        recipe_from_dict({"bits": 3})


def test_from_dict_validates_values_and_accepts_case():
    with pytest.raises(ValueError, match="bits=0"):
        recipe_from_dict({"method": "rtn", "bits": 0})
    assert recipe_from_dict({"method": "GPTQ", "bits": 2}) == GPTQ(bits=2)
    data = {"method": "rtn", "bits": 2}
    recipe_from_dict(data)
    assert data == {"method": "rtn", "bits": 2}  # input not mutated


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(-2, 12),
    group_size=st.one_of(st.none(), st.integers(-2, 512)),
    damp=st.floats(-1.0, 1.0, allow_nan=False),
    symmetric=st.booleans(),
)
def test_gptq_hypothesis(bits, group_size, damp, symmetric):
    valid = 1 <= bits <= 8 and (group_size is None or group_size >= 1) and damp > 0
    if valid:
        r = GPTQ(bits=bits, group_size=group_size, damp=damp, symmetric=symmetric)
        assert recipe_from_dict(recipe_to_dict(r)) == r
    else:
        with pytest.raises(ValueError):
            GPTQ(bits=bits, group_size=group_size, damp=damp, symmetric=symmetric)


def test_named_recipes_fit_their_group_to_the_model():
    from jaxquant.recipes_named import named_recipe

    assert named_recipe("gptq-3") == GPTQ(bits=3, group_size=128)
    # SmolLM2's input widths 576 and 1536: 128 divides neither 576 nor (so) all, 64 divides both.
    assert named_recipe("gptq-3", d_ins=(576, 576, 1536)) == GPTQ(bits=3, group_size=64)
    assert named_recipe("rtn-2", d_ins=(4096, 11008)) == RTN(bits=2, group_size=128)
    # An explicit group is kept (the layer check then names any width it does not divide).
    assert named_recipe("gptq-3-g128", d_ins=(576,)) == GPTQ(bits=3, group_size=128)
    assert named_recipe("aqlm-2x8", d_ins=(576,)) == AQLM(num_codebooks=2, codebook_bits=8, group_size=8)
    with pytest.raises(ValueError, match="gptq-x"):
        named_recipe("gptq-x")
