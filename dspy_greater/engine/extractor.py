"""The answer extractor: the text that follows the optimizer model's reasoning.

GReaTer measures how likely the gold answer is *after* the model's own reasoning. To make that
likelihood well defined, a short fixed text (the extractor) is appended right after the reasoning,
and the gold answer's tokens are scored right after it::

    <inputs> <instruction> <reasoning>  +  extractor.text  +  extractor.target(gold)
                                           "\\nTherefore, the final answer (one of (A), (B)) is ("
                                                                                  "B)"

The paper writes one such string per task by hand. Here it is derived from the output field's name
and description and from the labels (and option lines seen in the inputs), with no per-task code.

Answer kinds:

- ``"letter"``: multiple choice with lettered options, labels like ``"(B)"``. ``text`` ends with
  ``" ("`` and the target is the bare letter and the closing parenthesis, ``"B)"``: the first scored
  token is the letter itself.
- ``"choice"``: a small closed set of words (yes/no, true/false, valid/invalid, or the ``- option``
  lines listed in every input), canonical casing taken from the labels.
- ``"integer"``: whole numbers, possibly negative, possibly with thousands separators (``"1,080"``).
  Compared by value: the canonical label drops the separators and leading zeros (``"1080"``), and
  that is the text scored after the extractor.
- ``"text"``: anything else (free text, e.g. a sorted word list or a bracket sequence).

Space convention: ``text`` never ends with whitespace; the separating space belongs to the target
(``" Yes"``, ``" -42"``, ``" ] )"``). With byte-level BPE tokenizers (GPT-2 style, as SmolLM2's)
the pre-tokenizer always starts a new piece at a space, so the tokens of ``text + target`` are the
tokens of ``text`` followed by the tokens of ``target``: nothing merges across the boundary.
The exception is the letter kind, whose ``text`` ends with an opening parenthesis and whose target
starts with the letter (``" ("`` and ``"B"`` are separate pieces for the same reason).
User-written extractor texts (``override``) may end differently; :meth:`Extractor.target` then
adapts (no leading space after whitespace or an opening bracket or quote).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Extractor", "derive_extractor", "KINDS"]

KINDS = ("letter", "choice", "integer", "text")

# Closed word pairs recognised as "choice" answers, in the order the choices are listed.
_CLOSED_SETS: tuple[tuple[str, ...], ...] = (
    ("yes", "no"),
    ("true", "false"),
    ("valid", "invalid"),
)

# "(B)" / "(b)" / "( B )"
_PAREN_LETTER = re.compile(r"^\(\s*([A-Za-z])\s*\)$")
# "B", "b", "B)", "B." (bare letters; only trusted as option letters when the inputs list options)
_BARE_LETTER = re.compile(r"^([A-Za-z])[.)]?$")
# "(A) text" or "A) text" at the start of a line of an input
OPTION_LINE = re.compile(r"^[ \t]*\(?([A-Z])\)[ \t]+\S", re.MULTILINE)
# "- text" at the start of a line of an input
_DASH_OPTION_LINE = re.compile(r"^[ \t]*[-*][ \t]+(\S[^\n]*?)[ \t]*$", re.MULTILINE)
# "42", "-7", "+3", "1,080" (thousands separators in groups of three): compared by value, so "1,080" == "1080"
_INTEGER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)$")
_INTEGER_IN_TEXT = re.compile(r"(?<![\w.])([+\-\u2212]?)\s?(\d{1,3}(?:,\d{3})+|\d+)(?!\d|[.,]\d)")
_OPENERS = "([{<\"'`$"
_STRIP_CHARS = " \t\r\n\"'`*_“”‘’"

# Share of labels that must look like option letters for a dataset whose inputs list options to
# be treated as multiple choice. Tolerates a few malformed gold labels (BBH movie_recommendation
# has one row whose target is "Monsters, Inc"); those labels raise in ``canonical``.
_LETTER_MIN_SHARE = 0.9
# Dash options ("- Yes") only define a closed choice set when there are few distinct ones.
_MAX_DASH_CHOICES = 10


@dataclass(frozen=True)
class Extractor:
    """How the answer is read after the reasoning. See the module docstring for conventions."""

    kind: str
    text: str
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown extractor kind {self.kind!r}; expected one of {KINDS}")
        if self.kind in ("letter", "choice") and not self.choices:
            raise ValueError(f"an extractor of kind {self.kind!r} needs its choices")
        if self.kind == "letter":
            bad = [c for c in self.choices if not _PAREN_LETTER.match(c) or c != c.upper()]
            if bad:
                raise ValueError(f"letter choices must look like '(A)'; got {bad}")
        object.__setattr__(self, "choices", tuple(self.choices))

    # ------------------------------------------------------------------ labels

    @property
    def closed(self) -> bool:
        """True when the answer space is a fixed list of choices."""
        return self.kind in ("letter", "choice")

    def canonical(self, label: object) -> str:
        """Normalize a gold label to its canonical form.

        ``"(b)"``, ``"b"``, ``"B."`` -> ``"(B)"``; ``"yes"`` -> ``"Yes"`` (the casing of the choices);
        ``"+07"`` -> ``"7"``; text is stripped. Raises ``ValueError`` naming the label and the
        allowed answers when it is outside the answer space.
        """
        raw = _as_text(label)
        s = raw.strip()
        if not s:
            raise ValueError(f"empty label {raw!r}")
        if self.kind == "letter":
            m = _PAREN_LETTER.match(s) or _BARE_LETTER.match(s)
            if m:
                c = f"({m.group(1).upper()})"
                if c in self.choices:
                    return c
            raise ValueError(
                f"label {raw!r} is not one of the allowed answers {', '.join(self.choices)}"
            )
        if self.kind == "choice":
            found = self._match_choice(s.rstrip(".").strip(), whole=True)
            if found is None:
                raise ValueError(
                    f"label {raw!r} is not one of the allowed answers {', '.join(self.choices)}"
                )
            return found
        if self.kind == "integer":
            t = s.replace("\u2212", "-")
            if not _INTEGER.match(t):
                raise ValueError(f"label {raw!r} is not an integer (extractor kind 'integer')")
            return str(int(t.replace(",", "")))
        return s

    def accepts(self, label: object) -> bool:
        """Whether ``canonical(label)`` succeeds."""
        try:
            self.canonical(label)
        except ValueError:
            return False
        return True

    def target(self, label: object) -> str:
        """The text scored right after ``text`` for a gold label (canonicalized first)."""
        c = self.canonical(label)
        end = self.text[-1:] if self.text else ""
        if self.kind == "letter":
            letter = c[1]
            if end == "(":
                return letter + ")"
            if not end or end.isspace() or end in _OPENERS:
                return c
            return " " + c
        if not end or end.isspace() or end in _OPENERS:
            return c
        return " " + c

    def label_of(self, continuation: str | None) -> str | None:
        """Map what a model wrote after ``text`` back to a canonical label, or ``None``.

        Lenient about case, surrounding punctuation and trailing explanations:
        ``"B) because..."``, ``"b"``, ``"B."``, ``"(B)"`` -> ``"(B)"``; ``"yes."`` -> ``"Yes"``;
        ``"-12, since"`` -> ``"-12"``. For the text kind, the first non-empty line, stripped
        of quotes and a final period.
        """
        if continuation is None:
            return None
        s = continuation.strip()
        if not s:
            return None
        if self.kind == "letter":
            return self._letter_of(s)
        if self.kind == "choice":
            return self._choice_of(s)
        if self.kind == "integer":
            m = _INTEGER_IN_TEXT.search(s)
            if not m:
                return None
            sign = "-" if m.group(1) in ("-", "\u2212") else ""
            return str(int(sign + m.group(2).replace(",", "")))
        line = next((ln for ln in s.splitlines() if ln.strip()), "")
        line = line.strip(_STRIP_CHARS)
        if line.endswith(".") and not line.endswith(".."):
            line = line[:-1].rstrip(_STRIP_CHARS)
        return line or None

    # ------------------------------------------------------------------ helpers

    def _letter_of(self, s: str) -> str | None:
        allowed = {c[1] for c in self.choices}
        s = s.lstrip(_STRIP_CHARS)
        # Leading letter: "B", "B)", "(B)", "b.", "B because", "B: ..."
        m = re.match(r"^\(?\s*([A-Za-z])\s*(?:[).,:;*]|\s|$)", s)
        if m and m.group(1).upper() in allowed:
            return f"({m.group(1).upper()})"
        # Otherwise the first "(X)" in the first line: "option (C)", "the answer is (C)".
        first_line = s.splitlines()[0]
        for m in re.finditer(r"\(([A-Za-z])\)", first_line):
            if m.group(1).upper() in allowed:
                return f"({m.group(1).upper()})"
        return None

    def _choice_of(self, s: str) -> str | None:
        s = s.lstrip(_STRIP_CHARS + "-(:")
        return self._match_choice(s, whole=False)

    def _match_choice(self, s: str, *, whole: bool) -> str | None:
        low = s.casefold()
        # Longest first, so that "invalid" wins over "in..." prefixes and multi-word options win.
        for choice in sorted(self.choices, key=len, reverse=True):
            c = choice.casefold()
            if whole:
                if low == c:
                    return choice
            elif low.startswith(c) and (len(low) == len(c) or not low[len(c)].isalnum()):
                return choice
        return None


# ---------------------------------------------------------------------- derivation


def derive_extractor(
    output_field_name: str,
    output_field_desc: str | None,
    labels: Sequence[object],
    input_texts: Sequence[str],
    *,
    override: str | Extractor | None = None,
) -> Extractor:
    """Derive the extractor for one output field from its name, description, labels and inputs.

    Rules, in order (deterministic, nothing specific to a task name):

    1. ``letter`` when every label looks like ``"(A)"``, or when the inputs list lettered options
       (``"(A) ..."`` lines) and at least 90% of the labels are option letters (``"(A)"`` or
       ``"A"``). Choices: the union of the letters in the labels and in the inputs' option lines.
    2. ``choice`` when every label is in one of the closed pairs yes/no, true/false,
       valid/invalid (case-insensitive); both words of the pair are choices, cased like the
       majority of the labels. Also when every input lists the same ``"- option"`` lines (at
       most 10) and every label is one of them.
    3. ``integer`` when every label is an integer (possibly negative, possibly with thousands
       separators such as ``"1,080"``).
    4. ``text`` otherwise.

    ``override``: an :class:`Extractor` is returned as is; a string replaces the derived text
    (the kind and choices are still derived from the labels).
    """
    if isinstance(override, Extractor):
        return override
    if override is not None and not isinstance(override, str):
        raise TypeError(f"override must be a str or an Extractor, not {type(override).__name__}")
    labels_s = [_as_text(x).strip() for x in labels]
    if not labels_s:
        raise ValueError("cannot derive an answer extractor without any labels")
    if any(not s for s in labels_s):
        raise ValueError("cannot derive an answer extractor: some labels are empty")
    inputs = [str(x) for x in input_texts]

    kind, choices = _derive_kind(labels_s, inputs)
    if override is not None:
        if not override.strip():
            raise ValueError("an override extractor text must not be empty")
        text = override
    else:
        text = _wording(kind, choices, output_field_name, output_field_desc)
    return Extractor(kind=kind, text=text, choices=choices)


def _derive_kind(labels: list[str], inputs: list[str]) -> tuple[str, tuple[str, ...]]:
    # 1. letters
    option_letters = {m.group(1) for t in inputs for m in OPTION_LINE.finditer(t)}
    paren = [_PAREN_LETTER.match(s) for s in labels]
    if all(paren):
        letters = {m.group(1).upper() for m in paren} | option_letters
        return "letter", tuple(f"({c})" for c in sorted(letters))
    if option_letters:
        letter_like = [_PAREN_LETTER.match(s) or _BARE_LETTER.match(s) for s in labels]
        hits = [m.group(1).upper() for m in letter_like if m]
        if len(hits) >= _LETTER_MIN_SHARE * len(labels):
            letters = set(hits) | option_letters
            return "letter", tuple(f"({c})" for c in sorted(letters))

    # 2. closed word sets
    folded = [s.rstrip(".").strip().casefold() for s in labels]
    for pair in _CLOSED_SETS:
        if all(f in pair for f in folded):
            return "choice", _cased(pair, [s.rstrip(".").strip() for s in labels])
    dash = dash_options(inputs)
    if dash:
        by_fold = {d.casefold(): d for d in dash}
        if all(f in by_fold for f in folded):
            # Casing of each choice: the most common spelling among the labels (ties go to the
            # inputs' spelling), else the inputs'.
            spelled: dict[str, Counter] = {}
            for s in labels:
                spelled.setdefault(s.rstrip(".").strip().casefold(), Counter())[
                    s.rstrip(".").strip()
                ] += 1
            out = []
            for d in dash:
                cnt = spelled.get(d.casefold())
                out.append(min(cnt, key=lambda k: (-cnt[k], k != d, k)) if cnt else d)
            return "choice", tuple(out)

    # 3. integers
    if all(_INTEGER.match(s.replace("\u2212", "-")) for s in labels):
        return "integer", ()
    return "text", ()


def dash_options(inputs: list[str]) -> tuple[str, ...]:
    """The ``- option`` lines shared by every input (in first-seen order), if any."""
    if not inputs:
        return ()
    common: list[str] | None = None
    for t in inputs:
        opts = []
        for m in _DASH_OPTION_LINE.finditer(t):
            o = m.group(1).strip()
            if o and o.casefold() not in {x.casefold() for x in opts}:
                opts.append(o)
        if not opts:
            return ()
        if common is None:
            common = opts
        else:
            keep = {o.casefold() for o in opts}
            common = [o for o in common if o.casefold() in keep]
        if not common:
            return ()
    assert common is not None
    if len(common) < 2 or len(common) > _MAX_DASH_CHOICES:
        return ()
    return tuple(common)


def _cased(pair: tuple[str, ...], labels: list[str]) -> tuple[str, ...]:
    """Apply the majority casing style of the labels (Title, lower, UPPER) to a word pair."""
    styles = Counter()
    for s in labels:
        if s.isupper() and len(s) > 1:
            styles["upper"] += 1
        elif s.islower():
            styles["lower"] += 1
        else:
            styles["title"] += 1
    order = {"title": 0, "lower": 1, "upper": 2}  # tie-break, deterministic
    style = min(styles, key=lambda k: (-styles[k], order[k]))
    fn = {"title": str.capitalize, "lower": str.lower, "upper": str.upper}[style]
    return tuple(fn(w) for w in pair)


def _as_text(x: object) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return ""
    return str(x)


def _field_phrase(name: str) -> str:
    """``"answer"`` -> ``"final answer"``, ``"sorted_words"`` -> ``"final sorted words"``."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name or "answer")
    words = re.sub(r"[_\-\s]+", " ", words).strip().lower() or "answer"
    return words if words.startswith("final ") or words == "final" else f"final {words}"


def _informative_desc(name: str, desc: str | None) -> str | None:
    """A field description worth quoting: not DSPy's ``${name}`` placeholder, short, one line."""
    if not desc:
        return None
    d = " ".join(desc.split())
    if not d or re.fullmatch(r"\$\{?\w+\}?", d) or d.casefold() == (name or "").casefold():
        return None
    if "\n" in desc.strip() or len(d) > 80:
        return None
    return d.rstrip(".")


def _choice_list(kind: str, choices: tuple[str, ...]) -> str:
    if kind == "letter":
        letters = [c[1] for c in choices]
        contiguous = all(ord(b) - ord(a) == 1 for a, b in zip(letters, letters[1:]))
        if len(letters) > 4 and contiguous:
            return f"one of {choices[0]} to {choices[-1]}"
        return "one of " + ", ".join(choices)
    if len(choices) == 2:
        return f"{choices[0]} or {choices[1]}"
    return "one of " + ", ".join(choices)


def _wording(kind: str, choices: tuple[str, ...], name: str, desc: str | None) -> str:
    hints = []
    d = _informative_desc(name, desc)
    if d:
        hints.append(d)
    if kind in ("letter", "choice"):
        hints.append(_choice_list(kind, choices))
    elif kind == "integer":
        hints.append("an integer")
    paren = f" ({'; '.join(hints)})" if hints else ""
    text = f"\nTherefore, the {_field_phrase(name)}{paren} is"
    if kind == "letter":
        text += " ("
    return text
