"""Vertebra levels and names, and how a user's choice of vertebra is found in a label map or segmentation.

One place for what every front door accepts: a label value ("31", "31: vertebrae_L1"), a segment or structure
name ("vertebrae_L1"), or a level ("L1", "T12", "S1"; matched inside names such as "vertebrae_L1" or "L1 body").
Label maps without names get level names from the known label conventions (VerSe, TotalSegmentator v2,
AbdomenAtlas), each checked against the labels' centroids, which must run from head to feet.
"""

import re
from typing import Dict, Hashable, Optional, Sequence, Tuple

from .errors import InputError

# Levels from head to feet, T13 and L6 being anatomical variants (both occur in VerSe).
SPINE = tuple([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 14)] + [f"L{i}" for i in range(1, 7)]
              + ["S1"])
LUMBAR = ("L1", "L2", "L3", "L4", "L5")
_COMMON = [lv for lv in SPINE if lv not in ("T13", "L6", "S1")]  # C1 ... L5, the levels every convention has

# Label conventions. VerSe counts from C1 down; AbdomenAtlas counts from L5 up; TotalSegmentator v2 counts
# from S1 (26) up, i.e. AbdomenAtlas + 26.
VERSE_IDS = dict({lv: i + 1 for i, lv in enumerate(_COMMON)}, L6=25, T13=28)
ABDOMENATLAS_IDS = {lv: i + 1 for i, lv in enumerate(reversed(_COMMON))}
TOTALSEGMENTATOR_IDS = dict({lv: i + 26 for lv, i in ABDOMENATLAS_IDS.items()}, S1=26)
CONVENTIONS = {"VerSe": VERSE_IDS, "TotalSegmentator": TOTALSEGMENTATOR_IDS, "AbdomenAtlas": ABDOMENATLAS_IDS}

# A level inside a name: "L1", "l_1", "vertebrae_L1", "L1 body"; not "CL12" or "L123".
LEVEL_PATTERN = re.compile(r"(?<![A-Za-z0-9])([CTLS])[ _-]?(\d{1,2})(?!\d)", re.IGNORECASE)
_VALUE = re.compile(r"^\s*(\d+)\s*(:.*)?$")  # "31" or "31: vertebrae_L1" (the module's label list)


def level_of(text) -> Optional[str]:
    """The level named in ``text`` ("vertebrae_L1" -> "L1"), or None."""
    match = LEVEL_PATTERN.search(str(text or ""))
    return f"{match.group(1).upper()}{int(match.group(2))}" if match else None


def normalise_levels(levels: Sequence[str]) -> Tuple[str, ...]:
    """Upper-case level names, checked against SPINE; a single string is one level."""
    if isinstance(levels, str):
        levels = (levels,)
    out = tuple(str(lv).strip().upper() for lv in levels)
    unknown = [lv for lv in out if lv not in SPINE]
    if unknown or not out:
        raise InputError(f"unknown vertebra level(s) {', '.join(unknown) or '(none given)'}: "
                         f"use names such as {', '.join(LUMBAR)} or T12")
    return out


def level_order_problem(centroids: Dict[str, Sequence[float]], where: str) -> Optional[str]:
    """Why the levels' centroids (LPS, mm) do not run from head to feet (S coordinate decreasing), or None."""
    ordered = sorted(centroids, key=SPINE.index)
    for upper, lower in zip(ordered, ordered[1:]):
        if centroids[upper][2] <= centroids[lower][2]:
            return (f"{where}: {upper} (S {centroids[upper][2]:.1f} mm) is not above {lower} "
                    f"(S {centroids[lower][2]:.1f} mm): the label convention does not fit this file")
    return None


def convention_names(centroids: Dict[int, Sequence[float]]) -> Dict[int, str]:
    """Level names of a label map's values from the conventions that fit it: at least two of the convention's
    vertebrae present, in head-to-feet order. Empty when none fits, or when those that fit disagree."""
    fits = []
    for ids in CONVENTIONS.values():
        found = {lv: centroids[i] for lv, i in ids.items() if i in centroids}
        if len(found) >= 2 and level_order_problem(found, "") is None:
            fits.append({i: lv for lv, i in ids.items() if i in centroids})
    if not fits or any(f != fits[0] for f in fits[1:]):
        return {}
    return fits[0]


def resolve_vertebra(choices: Dict[Hashable, str], text, what: str, noun: str, owner: str,
                     kind: str = "label") -> Tuple[Hashable, str]:
    """(key, readable name) of the vertebra ``text`` among ``choices`` (key -> name, "" when unnamed).

    Keys are label values (``kind`` "label") or segment IDs (``kind`` "segment"). ``text`` may be a key, a
    "value: name" entry, a name (exact, then ignoring case), a level matched inside the names, or empty when
    there is a single choice. ``what`` ("fixed", "moving"), ``noun`` ("labelmap", "label map",
    "segmentation") and ``owner`` (the node's name in quotes, or the file) make the error messages.
    """
    container = f"the {what} {noun} {owner}"
    text = "" if text is None else str(text).strip()
    readable = {k: (n or str(k)) for k, n in choices.items()}
    listing = ", ".join(readable.values()) if kind == "segment" else ", ".join(map(str, choices))
    if not choices:
        raise InputError(f"{container} has no {kind}" if kind == "segment" else f"{container} is empty")
    if not text:
        if len(choices) == 1:
            key = next(iter(choices))
            return key, readable[key]
        count = f"{len(choices)} segments ({listing})" if kind == "segment" else f"labels {listing}"
        raise InputError(f"choose the {what} vertebra: {owner} has {count}")
    by_key = [k for k in choices if str(k) == text]
    if by_key:
        return by_key[0], readable[by_key[0]]
    number = _VALUE.match(text)
    if kind == "label" and number:
        value = int(number.group(1))
        if value == 0:
            raise InputError(f"label 0 is the background of {container}, not a vertebra (labels present: {listing})")
        if value not in choices:
            raise InputError(f"label {value} is not in {container} (labels present: {listing})")
        return value, readable[value]
    exact = [k for k, n in choices.items() if n and n == text] \
        or [k for k, n in choices.items() if n and n.lower() == text.lower()]
    if exact:
        return exact[0], readable[exact[0]]
    level = level_of(text)
    by_level = [k for k, n in choices.items() if level and n and level_of(n) == level]
    if len(by_level) == 1:
        return by_level[0], readable[by_level[0]]
    if kind == "segment":
        raise InputError(f"{container} has no segment '{text}' (segments: {listing})")
    named = ", ".join(f"{k}={n}" for k, n in choices.items() if n)
    raise InputError(f"cannot find '{text}' in {container}: give a label value ({listing})"
                     + (f"; names known: {named}" if named else "; its labels have no names"))
