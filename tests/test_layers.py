"""Layer syntax and resolution to the attn1 modules of real UNet trees."""

import pytest

from lib_seg import parse_layers, resolve_attn1
from lib_seg.layers import LayerSelection


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("middle", "middle"),
        ("MID", "middle"),
        ("middle 0", "middle"),
        ("input 7-8", "input 7-8"),
        ("in 8, in 7", "input 7-8"),
        ("output 0-2 5", "output 0-2 5"),
        ("up 5; down 1 2 3; mid", "input 1-3, middle, output 5"),
        ("input", "input"),
        ("input, input 4", "input"),
        ("all", "all"),
        ("input, middle, output", "input, middle, output"),
        ("double 7-9", "double 7-9"),
        ("Single 3 1-2; double 9 8 7", "double 7-9, single 1-3"),
        ("joint 5-12", "joint 5-12"),
        ("middle, joint", "middle, joint"),
        ("blocks 18-20", "block 18-20"),
        ("Layers 9, block 3", "block 3 9"),
        ("double 2-4, layer", "double 2-4, block"),
        (" Output  3 ,middle ", "middle, output 3"),
    ],
)
def test_parse_and_canonical(text, canonical):
    selection = parse_layers(text)
    assert selection.canonical() == canonical
    assert parse_layers(canonical) == selection


@pytest.mark.parametrize(
    "text", ["", " , ", "middle 3", "inputs 1", "input x", "input 5-2", "input 1000", "7-8"]
)
def test_bad_syntax_raises(text):
    with pytest.raises(ValueError):
        parse_layers(text)


def test_non_text_raises():
    with pytest.raises(ValueError):
        parse_layers(7)  # type: ignore[arg-type]


def names(unet, text):
    return [name for name, _ in resolve_attn1(unet, parse_layers(text))]


def test_sd1_resolution(sd1):
    assert names(sd1, "middle") == ["middle_block.1.transformer_blocks.0.attn1"]
    assert names(sd1, "input 7-8") == [
        "input_blocks.7.1.transformer_blocks.0.attn1",
        "input_blocks.8.1.transformer_blocks.0.attn1",
    ]
    assert len(names(sd1, "input")) == 6  # SD1: attention in input blocks 1,2,4,5,7,8
    assert len(names(sd1, "output")) == 9
    assert names(sd1, "input 0, input 3, output 0-2") == []  # blocks without attention
    assert all(n.endswith("attn1") for n in names(sd1, "all"))


def test_sd2_resolution(sd2):
    assert names(sd2, "middle") == ["middle_block.1.transformer_blocks.0.attn1"]


def test_sdxl_like_resolution(sdxl_like):
    middle = names(sdxl_like, "middle")
    assert middle == [f"middle_block.1.transformer_blocks.{i}.attn1" for i in range(10)]
    assert len(names(sdxl_like, "input")) == 24
    assert len(names(sdxl_like, "output")) == 36
    assert names(sdxl_like, "input 11") == []  # SDXL has 9 input blocks


def test_cross_attention_attn1_is_skipped(sd1):
    block = sd1.middle_block[1].transformer_blocks[0]
    block.disable_self_attn = True
    try:
        assert names(sd1, "middle") == []
    finally:
        block.disable_self_attn = False


def test_empty_selection():
    assert LayerSelection().is_empty()
    assert not parse_layers("middle").is_empty()
