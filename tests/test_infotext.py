"""A1111's ``parameters`` text: the layout and quoting of ``create_infotext``, read back by the
real ``sd-parsers`` package from a PNG, and by A1111's own reading rule (its regex and
``unquote``, restated here) for quoted values, which sd-parsers 0.6 does not unquote."""
import io
import json
import re

import pytest
from PIL import Image

from sdrt.engine.infotext import (SAMPLER_LABELS, Infotext, parse, png_bytes, quote,
                                  sampler_id, written_schedule)
from sdrt.engine.request import SAMPLER_NAMES

# A1111's modules/infotext_utils.py reads "Key: value" pairs with this pattern, then unquotes
# values that start and end with '"' with json.loads.
_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(text):
    """A1111's parse_generation_parameters, reduced to prompt, negative prompt and pairs."""
    *lines, last = text.strip().split("\n")
    if len(_A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    pairs = {}
    for k, v in _A1111_PARAM.findall(last):
        if v[:1] == '"' and v[-1:] == '"':
            v = json.loads(v)
        pairs[k] = v
    return "\n".join(prompt), "\n".join(negative), pairs


def parse_png(data):
    ParserManager = pytest.importorskip("sd_parsers").ParserManager
    return ParserManager().parse(Image.open(io.BytesIO(data)))


def info(**kw):
    base = dict(prompt="a red fox", negative_prompt="blurry", steps=20, sampler="euler_a",
                cfg_scale=7.0, seed=42, width=512, height=768, model_name="sd15",
                model_hash="6ce0161689")
    return Infotext(**{**base, **kw})


def test_layout_is_a1111s():
    assert str(info()) == ("a red fox\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, "
                           "CFG scale: 7, Seed: 42, Size: 512x768, Model hash: 6ce0161689, "
                           "Model: sd15")
    # No negative prompt: no line for it; img2img strength and clip skip (A1111 counts 1 as
    # the last layer, so sdrt's clip_skip=1 is "Clip skip: 2").
    text = str(info(negative_prompt="", denoising_strength=0.75, clip_skip=1, cfg_scale=7.5))
    assert text == ("a red fox\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, "
                    "Size: 512x768, Model hash: 6ce0161689, Model: sd15, "
                    "Denoising strength: 0.75, Clip skip: 2")


@pytest.mark.parametrize("value, expected", [
    ("plain", "plain"),
    ("a, b", '"a, b"'),                  # comma: quoted
    ("key: value", '"key: value"'),      # colon: quoted
    ("two\nlines", '"two\\nlines"'),     # newline: quoted, escaped
    ('say "hi", ok', '"say \\"hi\\", ok"'),  # quotes inside a quoted value are escaped
    ('say "hi"', 'say "hi"'),            # ... but alone do not cause quoting (as A1111)
    ("café, 東京", '"café, 東京"'),       # unicode kept as is (ensure_ascii=False)
    (7, "7"),
])
def test_quote_matches_a1111(value, expected):
    assert quote(value) == expected


TRICKY_PROMPTS = [
    "a fox, in the snow: (masterpiece:1.2), [detailed]",
    "line one\nline two, with a comma",
    'a "quoted" word, and \\ a backslash',
    "東京の夜景, ネオン, café crème — ünïcödé 🦊",
]


@pytest.mark.parametrize("prompt", TRICKY_PROMPTS)
def test_sd_parsers_reads_it_back_from_a_png(prompt):
    negative = "blurry, lowres: bad\nanatomy"
    text = str(info(prompt=prompt, negative_prompt=negative, seed=2 ** 40 + 3,
                    sampler="dpmpp_2m_karras", cfg_scale=5.5))
    png = png_bytes(Image.new("RGB", (8, 8)), text)
    assert Image.open(io.BytesIO(png)).info["parameters"] == text
    parsed = parse_png(png)
    assert parsed is not None, "sd-parsers did not recognise the image"
    assert parsed.generator.name == "AUTOMATIC1111"
    assert parsed.full_prompt == prompt
    assert parsed.full_negative_prompt == negative
    sampler = parsed.samplers[0]
    assert sampler.name == "DPM++ 2M Karras"
    assert sampler.parameters["seed"] == str(2 ** 40 + 3)
    assert sampler.parameters["steps"] == "20"
    assert sampler.parameters["cfg_scale"] == "5.5"
    assert sampler.model.name == "sd15" and sampler.model.hash == "6ce0161689"
    assert parsed.metadata["Size"] == "512x768"


@pytest.mark.parametrize("model_name", ["my, model", "v2: final", "line\nbreak", "ünï, 東京"])
def test_quoted_values_round_trip_through_a1111s_reader(model_name):
    text = str(info(model_name=model_name, prompt=TRICKY_PROMPTS[0]))
    prompt, negative, pairs = a1111_parse(text)
    assert (prompt, negative) == (TRICKY_PROMPTS[0], "blurry")
    assert pairs["Model"] == model_name
    assert pairs["Seed"] == "42" and pairs["Sampler"] == "Euler a"


def test_sampler_labels_and_aliases():
    assert set(SAMPLER_LABELS) == set(SAMPLER_NAMES)
    for sid, label in SAMPLER_LABELS.items():
        # (A label without a schedule type means A1111's default schedule for it.)
        assert sampler_id(label, "Uniform" if written_schedule(sid) else None) == sid
        assert sampler_id(label.upper(), "uniform" if written_schedule(sid) else None) == sid
        assert sampler_id(sid) == sid
    assert sampler_id("k_euler_a") == "euler_a"
    assert sampler_id("PLMS") == "pndm"
    assert sampler_id("k_dpm_2_a_ka") == "dpm2_a_karras"
    assert sampler_id("k_dpmpp_sde_ka") == "dpmpp_sde_karras"
    assert sampler_id("DPM fast") == "dpm_fast_a"  # at A1111's eta for ancestral samplers, 1
    assert sampler_id("DPM adaptive") is None and sampler_id(None) is None
    assert sampler_id("Restart") == "restart_karras"  # A1111 1.9's default: Karras
    assert sampler_id("DPM++ 2S a") == "dpmpp_2s_a_karras"  # A1111 1.9's default: Karras


@pytest.mark.parametrize("label,schedule_type,expected", [
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),    # A1111 1.9+: the pair
    ("DPM++ 2M Karras", "Karras", "dpmpp_2m_karras"),  # the old label with it
    ("DPM++ 2M SDE", "karras", "dpmpp_2m_sde_karras"),
    ("Euler", "Karras", "euler_karras"),
    # Automatic (or none given) is A1111 1.9's default of the label: Karras for DPM++ 2M,
    # DPM++ SDE, DPM2 and DPM2 a, Exponential for the SDE DPM-Solvers, Uniform otherwise.
    ("DPM2 a", "Automatic", "dpm2_a_karras"),
    ("DPM++ 2M", None, "dpmpp_2m_karras"),
    ("dpm++ 2m sde", "", "dpmpp_2m_sde_exponential"),
    ("DPM++ 2M SDE Heun", None, "dpmpp_2m_sde_heun_exponential"),
    ("DPM++ 3M SDE", "Automatic", "dpmpp_3m_sde_exponential"),
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),  # an old label names its schedule
    ("dpmpp_2m", None, "dpmpp_2m"),  # sdrt's ids mean what they say
    ("k_dpmpp_2m", None, "dpmpp_2m"),
    ("Heun", None, "heun"),
    ("Heun", "", "heun"),
    ("Euler a", "Automatic", "euler_a"),
    ("DPM++ 2M", "Uniform", "dpmpp_2m"),
    ("DPM++ 2M SDE Karras", "uniform", "dpmpp_2m_sde"),
    ("DPM++ 3M SDE", "Exponential", "dpmpp_3m_sde_exponential"),
    ("Euler a", "Karras", "euler_a_karras"),
    ("DDIM", "Karras", None),  # no Karras variant
    ("Euler", "Exponential", "euler_exponential"),  # the sigma schedule (request.py)
    ("DPM++ 2M SDE Karras", "Exponential", None),  # the label and the type disagree
    ("Euler", "Beta", "euler_beta"),
    ("Euler", "Karras Exponential", None),  # a schedule type sdrt does not have
    ("LMS", "Karras", "lms_karras"),
    ("DPM++ SDE", "Karras", "dpmpp_sde_karras"),
    ("DPM++ 2S a", "Karras", "dpmpp_2s_a_karras"),
    ("DPM++ 2S a", "Uniform", "dpmpp_2s_a"),
    ("Restart", "Karras", "restart_karras"), ("Restart", "Beta", "restart_beta"),
    ("DPM adaptive", "Karras", None),  # a sampler sdrt does not have
    ("Euler", 3, None),
])
def test_sampler_with_schedule_type(label, schedule_type, expected):
    assert sampler_id(label, schedule_type) == expected


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_reads_back_from_its_png_info(sampler):
    # What sdrt writes (the label, and "Schedule type: Uniform" where A1111 would read the
    # label with another default) is read back, as A1111 1.9 reads it, as the same sampler.
    info = Infotext("a", "", 20, sampler, 7.0, 1, 64, 64)
    _, _, pairs = parse(str(info))
    assert sampler_id(pairs["Sampler"], pairs.get("Schedule type")) == sampler, str(info)


def test_lora_tags_as_a1111_reads_them():
    from sdrt.engine.infotext import lora_tag, lora_tags
    text, tags = lora_tags("a fox <lora:ink> <lora:a:0.5> <lora:b:0.2:0.9> <lora:c:te=0.3> "
                           "<lora:d:1:unet=0.4> <lora:e:0.6:0.6>, snow")
    assert text == "a fox      , snow"  # (the spaces around each tag stay)
    # the first multiplier the text encoders', the second the UNet's; a pair (UNet's, text
    # encoders') where they differ
    assert tags == [("ink", 1.0), ("a", 0.5), ("b", (0.9, 0.2)), ("c", 0.3), ("d", (0.4, 1.0)),
                    ("e", 0.6)]
    assert [lora_tag(n, s) for n, s in tags[1:3]] == ["<lora:a:0.5>", "<lora:b:0.2:0.9>"]
    for bad, why in (("<lora:x:y>", "not a number"), ("<lora:x:1:1:16>", "dynamic rank"),
                     ("<lora:x:1:dyn=16>", "dynamic rank"), ("<lora:x:up=2>", "does not take")):
        with pytest.raises(ValueError, match=why):
            lora_tags(f"a {bad}")
