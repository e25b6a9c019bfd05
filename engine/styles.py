"""A1111's prompt styles: a ``styles.csv`` of named prompt and negative-prompt snippets, applied
to a request's prompts as A1111 applies them (``modules/styles.py``).

A style's text holding ``{prompt}`` has the prompt put in its place; any other is appended
after the prompt with ", " (either may be empty: then the other alone). Several styles apply
in order, each to the result of the ones before. The negative prompt takes the styles'
negative texts the same way."""
import csv
from dataclasses import dataclass

from .errors import SdrtError

MAX_STYLES_BYTES = 16 * 2 ** 20  # a styles file past this is refused, not read


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def read_styles(path):
    """{name: Style} of an A1111 ``styles.csv``: a header naming ``name``, ``prompt`` (or the
    old ``text``) and optionally ``negative_prompt`` columns, UTF-8 (with or without a BOM);
    a later row of the same name replaces an earlier one, as in A1111."""
    import io
    import os
    if not os.path.isfile(path):  # (a device such as /dev/zero would never end)
        raise SdrtError(f"styles file {path} is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STYLES_BYTES + 1)
        if len(data) > MAX_STYLES_BYTES:
            raise SdrtError(f"styles file {path} is larger than {MAX_STYLES_BYTES >> 20} MiB")
        text = data.decode("utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True))
    except UnicodeDecodeError as e:
        raise SdrtError(f"styles file {path} is not UTF-8 text ({e.reason} at byte "
                        f"{e.start})") from None
    except (OSError, csv.Error) as e:
        raise SdrtError(f"styles file {path} cannot be read: "
                        f"{getattr(e, 'strerror', None) or e}") from None
    styles = {}
    for number, row in enumerate(rows, start=2):  # (line 1: the header)
        text = row.get("prompt", row.get("text"))
        name = row.get("name")
        if not name or text is None:
            raise SdrtError(f"styles file {path}, line {number}: a style needs a name and a "
                            f"prompt (the header's name and prompt columns), got "
                            f"{dict((k, v) for k, v in row.items() if k is not None)}")
        styles[name] = Style(name, text, row.get("negative_prompt") or "")
    return styles


def _pieces(style_text, prompt):
    """(pieces, separator) whose join is one style's text applied to a prompt, as A1111's
    ``merge_prompts`` applies it: the style's text around each ``{prompt}`` joined by the
    prompt, or else the stripped prompt and text that are not empty joined by ", "."""
    if "{prompt}" in style_text:
        return style_text.split("{prompt}"), prompt
    return [part for part in (prompt.strip(), style_text.strip()) if part], ", "


def merge(style_text, prompt):
    """One style's text applied to a prompt, as A1111's ``merge_prompts``."""
    pieces, separator = _pieces(style_text, prompt)
    return separator.join(pieces)


def merged_length(style_text, prompt):
    """``len(merge(style_text, prompt))``, without building it."""
    pieces, separator = _pieces(style_text, prompt)
    return sum(map(len, pieces)) + len(separator) * max(len(pieces) - 1, 0)


def apply(styles, names, prompt, negative_prompt, field="styles", max_chars=None):
    """(prompt, negative prompt) with the styles ``names`` (in order) applied to them; a name
    ``styles`` does not hold, or a styled prompt past ``max_chars`` characters, is refused
    (before it is built), naming ``field``."""
    texts = [prompt, negative_prompt]
    for name in names:
        if name not in styles:
            known = ", ".join(map(repr, sorted(styles)[:10])) or "none"
            known += ", ..." if len(styles) > 10 else ""
            raise SdrtError(f"{field} names {name!r}, which is not a style here (the styles "
                            f"file holds {known})")
        style = styles[name]
        for i, text in enumerate((style.prompt, style.negative_prompt)):
            if max_chars is not None and merged_length(text, texts[i]) > max_chars:
                raise SdrtError(f"{field}: style {name!r} makes the "
                                f"{'negative ' * i}prompt longer than {max_chars} characters "
                                f"(SDRT_MAX_PROMPT_CHARS)")
            texts[i] = merge(text, texts[i])
    return texts[0], texts[1]
