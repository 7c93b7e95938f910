"""Find and replace identifiers inside free text (Clean Descriptors, SR TEXT, graphics).

Two sources: the object's own :class:`~dicom_deid.element.PhiContext` (names in every
order, IDs, birth date, address parts, institutions) and patterns (NHS numbers with a valid
modulus-11 check digit, dates, UK phone numbers, UK postcodes, e-mail addresses). Matches
are replaced by a bracketed placeholder naming the kind (``[NAME]``, ``[DATE]``...), so the
clinical words around them survive: "CT CHEST QUIMBLEY follow-up" -> "CT CHEST [NAME] follow-up".
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

from .element import PhiContext

MIN_NAME_PART = 3
MIN_ID = 3

_NHS = re.compile(r"(?<!\d)(\d{3})[ -]?(\d{3})[ -]?(\d{4})(?!\d)")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_POSTCODE = re.compile(r"\b(?:GIR ?0AA|[A-Z]{1,2}\d[A-Z\d]? ?\d[ABD-HJLNP-UW-Z]{2})\b", re.I)
_PHONE = re.compile(r"(?<![\w+])(?:\+44\s?\(?0?\)?\s?|\(?0)\d{2,4}\)?[\s-]?\d{3,4}[\s-]?\d{3,4}(?!\d)")
_MONTHS = ("JAN(?:UARY)?|FEB(?:RUARY)?|MAR(?:CH)?|APR(?:IL)?|MAY|JUNE?|JULY?|AUG(?:UST)?|"
           "SEP(?:T(?:EMBER)?)?|OCT(?:OBER)?|NOV(?:EMBER)?|DEC(?:EMBER)?")
_DATES = [
    re.compile(r"(?<!\d)(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)"),          # 20240301
    re.compile(r"(?<!\d)(?:19|20)\d{2}[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])(?!\d)"),  # 2024-03-01
    re.compile(r"(?<!\d)(?:0?[1-9]|[12]\d|3[01])[-/.](?:0?[1-9]|1[0-2])[-/.](?:19|20)?\d{2}(?!\d)"),  # 01/03/2024
    re.compile(r"(?<![A-Z0-9])(?:0?[1-9]|[12]\d|3[01])(?:ST|ND|RD|TH)?\s+(?:" + _MONTHS + r")\.?,?\s+(?:19|20)\d{2}(?!\d)", re.I),
    re.compile(r"(?<![A-Z])(?:" + _MONTHS + r")\.?\s+(?:0?[1-9]|[12]\d|3[01])(?:ST|ND|RD|TH)?,?\s+(?:19|20)\d{2}(?!\d)", re.I),
]


def nhs_check_digit(first9: str) -> Optional[int]:
    """Modulus-11 check digit of the first nine NHS number digits; None when no valid digit
    exists (remainder 10). The one implementation the project uses."""
    total = sum(int(d) * w for d, w in zip(first9, range(10, 1, -1)))
    check = 11 - total % 11
    if check == 11:
        return 0
    return None if check == 10 else check


def nhs_valid(digits: str) -> bool:
    """Ten ASCII digits whose last is the modulus-11 check digit of the first nine."""
    if len(digits) != 10 or not digits.isdigit() or not digits.isascii():
        return False
    return nhs_check_digit(digits[:9]) == int(digits[9])


def _name_forms(phi: PhiContext) -> tuple[list[str], list[str]]:
    """(whole-name forms, single components) upper-case, longest first."""
    forms, parts = set(), set()
    for name in phi.names:
        comps = [c.upper() for c in name if c]
        if not comps:
            continue
        if len(comps) >= 2:
            fam, given = comps[0], comps[1]
            rest = " ".join(comps[1:])
            forms.update({f"{given} {fam}", f"{fam} {given}", f"{fam}, {given}", f"{fam},{given}",
                          f"{fam}^{given}", "^".join(comps), f"{rest} {fam}", f"{fam}, {rest}"})
        for c in comps:
            for p in re.split(r"[\s,.\-']+", c):
                if len(p) >= MIN_NAME_PART:
                    parts.add(p)
    key = lambda s: (-len(s), s)  # noqa: E731
    return sorted(forms, key=key), sorted(parts, key=key)


class Cleaner:
    """Compiled patterns for one object's PHI context. Build once per object."""

    def __init__(self, phi: PhiContext):
        forms, parts = _name_forms(phi)
        self._subs: list[tuple[re.Pattern, str]] = []
        ids = sorted({i.upper() for i in phi.ids if len(i.strip()) >= MIN_ID}, key=lambda s: (-len(s), s))
        texts = set()
        for t in phi.texts:
            t = t.upper().strip()
            if len(t) >= 4:
                texts.add(t)
                texts.update(p.strip() for p in re.split(r"[,\^\n]", t) if len(p.strip()) >= 4)
        orgs = {o.upper().strip() for o in phi.orgs if len(o.strip()) >= 4}
        dates = {d.strip() for d in phi.dates if len(d.strip()) >= 6}
        for values, label in ((forms, "[NAME]"), (ids, "[ID]"), (sorted(texts, key=len, reverse=True), "[ADDRESS]"),
                              (sorted(orgs, key=len, reverse=True), "[INSTITUTION]"), (parts, "[NAME]"),
                              (sorted(dates), "[DATE]")):
            pat = _alternation(values)
            if pat is not None:
                self._subs.append((pat, label))

    def clean(self, text: str) -> tuple[str, int]:
        """Return (cleaned text, number of replacements)."""
        if not text:
            return text, 0
        n = 0
        out = text
        out, k = _EMAIL.subn("[EMAIL]", out)
        n += k
        for pat, label in self._subs:
            out, k = pat.subn(label, out)
            n += k
        out, k = _nhs_sub(out)
        n += k
        for pat in _DATES:
            out, k = pat.subn("[DATE]", out)
            n += k
        out, k = _PHONE.subn("[PHONE]", out)
        n += k
        out, k = _POSTCODE.subn("[POSTCODE]", out)
        n += k
        return out, n


def _alternation(values: Iterable[str]):
    vals = [v for v in values if v]
    if not vals:
        return None
    body = "|".join(re.escape(v).replace(r"\ ", r"\s+") for v in vals)
    return re.compile(r"(?<![A-Za-z0-9])(?:" + body + r")(?![A-Za-z0-9])", re.I)


def _nhs_sub(text: str) -> tuple[str, int]:
    count = 0

    def repl(m):
        nonlocal count
        if nhs_valid("".join(m.groups())):
            count += 1
            return "[NHS]"
        return m.group(0)

    return _NHS.sub(repl, text), count
