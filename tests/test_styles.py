"""A1111's prompt styles (``engine/styles.py``): a real ``styles.csv`` read as A1111 reads it
(BOM, quoted commas, the old ``text`` column), applied as its ``merge_prompts`` applies them;
``sdrt generate --styles-file --style`` and ``sdrt serve --styles-file`` with
``GET /sdapi/v1/prompt-styles`` and txt2img's ``styles``."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine.errors import SdrtError
from sdrt.engine.styles import apply, merge, merged_length, read_styles
from test_cli import _run

# As A1111's style editor saves it: a BOM, a header, quoted fields holding commas.
CSV = ('\ufeffname,prompt,negative_prompt\n'
       'photo,"{prompt}, 35mm photo, sharp focus","cartoon, drawing"\n'
       'moody,"dark, moody lighting",\n'
       'empty,,\n'
       '"with, comma","oil painting of {prompt}","blurry"\n')


@pytest.fixture()
def styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_bytes(CSV.encode("utf-8"))
    return str(path)


@pytest.mark.parametrize("style, prompt, want", [
    ("{prompt}, 35mm photo", "a fox", "a fox, 35mm photo"),
    ("dark, moody", "  a fox  ", "a fox, dark, moody"),   # appended: both stripped
    ("  dark  ", "", "dark"),                             # an empty prompt: the style alone
    ("", "  a fox ", "a fox"),                            # an empty style: the prompt, stripped
    ("{prompt} and {prompt}", " a fox", " a fox and  a fox"),  # replaced as it is, each time
])
def test_merge_is_a1111s(style, prompt, want):
    assert merge(style, prompt) == want
    assert merged_length(style, prompt) == len(want)


def test_read_and_apply(styles_file, tmp_path):
    styles = read_styles(styles_file)
    assert list(styles) == ["photo", "moody", "empty", "with, comma"]
    assert styles["moody"].negative_prompt == "" and styles["empty"].prompt == ""
    # in order, each on the result of the ones before; negatives the same way
    assert apply(styles, ["photo", "moody", "with, comma"], "a fox", "") == (
        "oil painting of a fox, 35mm photo, sharp focus, dark, moody lighting",
        "cartoon, drawing, blurry")
    with pytest.raises(SdrtError, match="styles names 'nope', which is not a style here \\(the "
                                        "styles file holds 'empty', 'moody', 'photo'"):
        apply(styles, ["nope"], "a fox", "")
    old = tmp_path / "old.csv"  # A1111's first format: name, text
    old.write_text("name,text\nplain,watercolor\n", encoding="utf-8")
    assert apply(read_styles(str(old)), ["plain"], "a fox", "") == ("a fox, watercolor", "")
    for content, message in ((b"prompt\nfoo\n", "line 2: a style needs a name and a prompt"),
                             (b"name,prompt\n\xff\xfe,x\n", "is not UTF-8 text")):
        bad = tmp_path / "bad.csv"
        bad.write_bytes(content)
        with pytest.raises(SdrtError, match=message):
            read_styles(str(bad))
    for not_a_file in (tmp_path / "missing.csv", tmp_path, "/dev/zero"):  # (never ends)
        with pytest.raises(SdrtError, match="is not a file"):
            read_styles(str(not_a_file))


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), im.text["parameters"]


def test_cli_styles(styles_file, tmp_path, capsys):
    base = ["generate", "--steps", "2", "--width", "32", "--height", "32", "--seed", "3",
            "--negative", "ugly"]
    styled = tmp_path / "styled.png"
    code, _, err = _run([*base, "a fox", "--styles-file", styles_file, "--style", "photo",
                         "--style", "moody", "-o", str(styled)], capsys)
    assert code == 0, err
    typed = tmp_path / "typed.png"
    code, _, err = _run([*base, "a fox, 35mm photo, sharp focus, dark, moody lighting",
                         "--negative", "ugly, cartoon, drawing", "-o", str(typed)], capsys)
    assert code == 0, err
    (got, text), (want, _) = _pixels(styled), _pixels(typed)
    assert text.startswith("a fox, 35mm photo, sharp focus, dark, moody lighting\n"
                           "Negative prompt: ugly, cartoon, drawing\n"), text
    assert np.array_equal(got, want)
    for extra, message in ((["--style", "photo"], "--style needs --styles-file FILE"),
                           (["--styles-file", styles_file, "--style", "nope"],
                            "--style names 'nope', which is not a style here")):
        code, _, err = _run([*base, "a fox", *extra, "-o", str(tmp_path / "x.png")], capsys)
        assert code == 2 and message in err, err


def test_a1111_api_styles(styles_file, tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.engine.demo.model import demo_pipeline
    from sdrt.serve.local import LocalServer
    from test_serve import TIMEOUT, assert_same_image, config
    body = {"prompt": "a fox", "negative_prompt": "ugly", "seed": 4, "steps": 2, "width": 32,
            "height": 32, "sampler_name": "Euler", "cfg_scale": 5}
    with LocalServer(config(styles_file=styles_file)) as url:
        listed = httpx.get(f"{url}/sdapi/v1/prompt-styles", timeout=TIMEOUT).json()
        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT,
                       json={**body, "styles": ["with, comma", "photo"]})
        bad = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT,
                         json={**body, "styles": ["nope"]})
    assert listed[0] == {"name": "photo", "prompt": "{prompt}, 35mm photo, sharp focus",
                         "negative_prompt": "cartoon, drawing"} and len(listed) == 4
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    prompt = "oil painting of a fox, 35mm photo, sharp focus"
    negative = "ugly, blurry, cartoon, drawing"
    assert (info["prompt"], info["negative_prompt"], info["styles"]) == (
        prompt, negative, ["with, comma", "photo"])
    assert info["infotexts"][0].startswith(f"{prompt}\nNegative prompt: {negative}\n")
    ref = demo_pipeline(torch.device("cpu"), torch.float32)
    want = ref(prompt, negative_prompt=negative, height=32, width=32, num_inference_steps=2,
               sampler="euler", guidance_scale=5.0, seed=4)[0]
    png = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert_same_image(png, want, "styles")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "styles", bad.text
    from sdrt.engine.errors import SdrtError as ConfigError
    junk = tmp_path / "junk.csv"
    junk.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):  # (before serving: one line)
        config(styles_file=str(junk))
    with LocalServer(config()) as url:
        none = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT,
                          json={**body, "styles": ["photo"]})
        assert httpx.get(f"{url}/sdapi/v1/prompt-styles", timeout=TIMEOUT).json() == []
    assert none.status_code == 400 and "no styles" in none.json()["error"]["message"], none.text


def test_a_styled_prompt_is_bounded_before_it_is_built():
    from sdrt.engine.styles import Style
    doubling = {"twice": Style("twice", "{prompt} {prompt}" * 1000, "")}
    with pytest.raises(SdrtError, match="styles: style 'twice' makes the prompt longer than "
                                        "20000 characters"):
        apply(doubling, ["twice"] * 40, "a fox", "", max_chars=20000)
    long = {"long": Style("long", "", "x" * 15000)}
    with pytest.raises(SdrtError, match="makes the negative prompt longer than 20000"):
        apply(long, ["long", "long"], "a fox", "", max_chars=20000)
    assert apply(long, ["long"], "a fox", "", max_chars=20000)[1] == "x" * 15000
