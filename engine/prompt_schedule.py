"""AUTOMATIC1111's prompt editing and alternation: which text a prompt is on each UNet call.

``[from:to:when]`` reads ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds
``to`` after ``when``; ``[from::when]`` drops ``from`` after it; ``[a|b|c]`` alternates from
step to step. They nest, and sit inside A1111's emphasis brackets, which are kept as they are
for ``prompt_syntax`` to read. ``when`` with a decimal point is a fraction of the steps, an
integer a step number; on a hires fix's second pass, a fraction past 1 or a step past the
first pass's steps is the second pass's (A1111 1.6's timeline).

A prompt that does not parse (an unmatched ``|``, a trailing ``\\``) is its own text on every
step, as A1111 falls back. The steps are A1111's: the sampler's steps, twice them for a
sampler A1111 marks second-order (two model calls a step), counted per UNet call from the
first one the pass runs; a call is on the first text whose end step it has not passed, and
past the last end on the first text, as A1111's ``reconstruct_cond_batch`` picks.
"""
import re
from dataclasses import dataclass

# A1111's samplers with "second_order": their editing steps count two per sampler step.
SECOND_ORDER = ("heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "restart",
                "cfgpp_dpmpp_2s_a")
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)


class _Fail(Exception):
    """A construct that does not parse where it was tried."""


@dataclass
class _Scheduled:
    before: list  # None for [to:when]
    after: list
    when: str
    step: int = 0  # ``when`` as a step, set by ``_collect``


@dataclass
class _Alternate:
    options: list


class _Parser:
    """Recursive descent over A1111's grammar: a prompt is a sequence of plain text,
    emphasis (kept as literal brackets around its parts), scheduled and alternating parts."""

    def __init__(self, text):
        self.text = text

    def start(self):
        """The whole text; brackets and colons that close nothing are literal, as A1111's
        grammar allows at the top; anything else that does not parse fails."""
        out, i, n = [], 0, len(self.text)
        while i < n:
            seq, i = self.prompt(i)
            out += seq
            if i < n:
                if self.text[i] not in "[]():":
                    raise _Fail()
                out.append(self.text[i])
                i += 1
        return out

    def prompt(self, i):
        """The longest prompt from ``i``: (its items, where it stops)."""
        out, n = [], len(self.text)
        while i < n:
            c = self.text[i]
            if c in "[(":
                try:
                    items, i = (self.square if c == "[" else self.round)(i)
                except _Fail:
                    break
                out += items
                continue
            m = _PLAIN.match(self.text, i)
            if not m:
                break
            out.append(m.group())
            i = m.end()
        return out, i

    def _expect(self, i, c):
        if i >= len(self.text) or self.text[i] != c:
            raise _Fail()
        return i + 1

    def round(self, i):
        """``(prompt)`` or ``(prompt:prompt)``, kept literally."""
        first, j = self.prompt(i + 1)
        if j < len(self.text) and self.text[j] == ":":
            second, k = self.prompt(j + 1)
            return ["(", *first, ":", *second, ")"], self._expect(k, ")")
        return ["(", *first, ")"], self._expect(j, ")")

    def square(self, i):
        """``[..:..:when]``, ``[..:when]``, ``[a|b...]`` or ``[prompt]`` (kept literally)."""
        first, j = self.prompt(i + 1)
        if j < len(self.text) and self.text[j] == ":":
            m = _NUMBER.match(self.text, j + 1)
            if m:
                return [_Scheduled(None, first, m.group(1))], m.end()
            second, k = self.prompt(j + 1)
            k = self._expect(k, ":")
            m = _NUMBER.match(self.text, k)
            if not m:
                raise _Fail()
            return [_Scheduled(first, second, m.group(1))], m.end()
        if j < len(self.text) and self.text[j] == "|":
            options = [first]
            while j < len(self.text) and self.text[j] == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            return [_Alternate(options)], self._expect(j, "]")
        return ["[", *first, "]"], self._expect(j, "]")


def _walk(items):
    for item in items:
        if isinstance(item, _Scheduled):
            yield item
            for part in (item.before or [], item.after):
                yield from _walk(part)
        elif isinstance(item, _Alternate):
            yield item
            for option in item.options:
                yield from _walk(option)


def _render(items, step):
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Scheduled):
            out.append(_render((item.before or []) if step <= item.step else item.after, step))
        else:
            out.append(_render(item.options[(step - 1) % len(item.options)], step))
    return "".join(out)


def schedule(prompt, steps, base_steps=None):
    """[(end step, text), ...] of ``prompt`` over ``steps`` editing steps (A1111's
    ``get_learned_conditioning_prompt_schedules``); ``base_steps``: this is a hires fix's
    second pass after a first pass of that many editing steps."""
    try:
        tree = _Parser(prompt).start()
    except _Fail:
        return [(steps, prompt)]
    int_offset, float_offset = (0, 0.0) if base_steps is None else (base_steps, 1.0)
    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
            continue
        v = float(node.when)
        v = (v - float_offset) * steps if "." in node.when else v - int_offset
        node.step = min(steps, int(v))
        if node.step >= 1:
            ends.add(node.step)
    return [(t, _render(tree, t)) for t in sorted(ends)]


def editing_steps(sampler, steps):
    """A1111's step count for prompt editing: twice the steps for a second-order sampler
    (``sampler`` an sdrt sampler id)."""
    from .request import split_sampler
    base, _ = split_sampler(sampler) or (sampler, None)
    return steps * 2 if base.removesuffix("_karras") in SECOND_ORDER else steps


def text_at(entries, call):
    """The text of a schedule (``schedule``'s entries) on UNet call ``call`` (from 0): the
    first entry whose end step ``call`` has not passed; past them all, the first."""
    for end, text in entries:
        if call <= end:
            return text
    return entries[0][1]


def edited(prompt):
    """Whether ``prompt`` edits or alternates (its text can change from step to step)."""
    try:
        return any(True for _ in _walk(_Parser(prompt).start()))
    except _Fail:
        return False


# A1111's composable diffusion: a prompt's parts split at the word AND, each with an optional
# trailing ":weight" (``prompt_parser.get_multicond_prompt_list``).
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def composable_parts(prompt):
    """[(text, weight), ...] of a prompt as A1111 reads it for composable diffusion: split at
    each ``AND``, a part's trailing ``:number`` its weight (default 1), the rest its text.
    A prompt without either is [(prompt, 1.0)]."""
    parts = []
    for part in _AND.split(prompt):
        m = _WEIGHT.search(part)
        text, weight = m.groups() if m else (part, None)
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts
