"""Phantom seeds: parse ``A-B`` lists, read the training seeds a model or reader records, refuse overlap.

A registry entry records the phantom seeds its training saw in ``training.phantom_seeds``, either as the
:func:`model_training.importers.phantom.import_phantoms` recipe ``{"import_phantoms": {"seed": S, "n_studies": N}}``
(study ``i`` used generator seed ``_phantom_seed(S, i)``, ``i < N``; a pathological study and its healthy twin share
that seed) or as an explicit list of generator seeds ``[s1, s2, ...]``; several recipes may be given as a list of
such objects. The benchmark and the reader training call :func:`check_disjoint` before generating anything.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from spine_ldm.errors import InputError


def parse_seeds(spec: str) -> list[int]:
    """``"1000-1019"``, ``"5,7,9"`` or ``"1000-1009,2000"`` -> sorted unique non-negative ints (ranges inclusive)."""
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise InputError(f"seeds: {part!r} is not N or A-B (A <= B, non-negative integers)") from None
    if not out or min(out) < 0:
        raise InputError(f"seeds {spec!r}: give at least one non-negative seed, e.g. 1000-1019")
    return sorted(out)


def format_seeds(seeds: Iterable[int]) -> str:
    """Inverse of :func:`parse_seeds`: ``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    s = sorted(set(int(v) for v in seeds))
    parts, i = [], 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(parts)


def expand_phantom_seeds(record) -> set[int]:
    """Generator seeds of a ``training.phantom_seeds`` record (see the module docstring); raises InputError on a
    malformed record."""
    from model_training.importers.phantom import _phantom_seed

    if record is None:
        return set()
    if isinstance(record, Mapping):
        if "import_phantoms" in record:
            r = record["import_phantoms"]
            try:
                s, n = int(r["seed"]), int(r["n_studies"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"phantom_seeds.import_phantoms needs integer 'seed' and 'n_studies', got {r!r}") \
                    from None
            return {_phantom_seed(s, i) for i in range(n)}
        if "seeds" in record:
            return expand_phantom_seeds(record["seeds"])
        raise InputError(f"phantom_seeds record {record!r}: expected {{'import_phantoms': {{'seed', 'n_studies'}}}}, "
                         f"{{'seeds': [...]}} or a list")
    if isinstance(record, str):
        return set(parse_seeds(record))
    if isinstance(record, Iterable):
        out: set[int] = set()
        for r in record:
            if isinstance(r, bool):
                raise InputError(f"phantom_seeds: {r!r} is not a seed")
            out |= {int(r)} if isinstance(r, int) else expand_phantom_seeds(r)
        return out
    raise InputError(f"phantom_seeds record {record!r} not understood")


def recorded_seeds(entry_or_extra) -> set[int] | None:
    """The phantom generator seeds an entry (a registry ``ModelEntry``, or a JSON dict) records under
    ``training.phantom_seeds``; ``None`` when it records none (unknown training data)."""
    extra = getattr(entry_or_extra, "extra", entry_or_extra) or {}
    training = extra.get("training") if isinstance(extra, Mapping) else None
    if not isinstance(training, Mapping) or "phantom_seeds" not in training:
        return None
    return expand_phantom_seeds(training["phantom_seeds"])


def check_disjoint(seeds: Iterable[int], used: Mapping[str, set[int] | None], what: str = "benchmark") -> list[str]:
    """Raise :class:`InputError` naming the model id(s) and overlapping seeds when ``seeds`` meet any set in
    ``used`` (model id -> its training seeds). Returns the ids that record no seeds (the caller warns)."""
    seeds = set(int(s) for s in seeds)
    clashes = []
    for mid, tr in used.items():
        if tr and seeds & tr:
            both = sorted(seeds & tr)
            more = " ..." if len(both) > 20 else ""
            clashes.append(f"{mid!r} ({len(both)} seed(s): {format_seeds(both[:20])}{more})")
    if clashes:
        raise InputError(f"{what} seeds overlap the phantom seeds these models/readers were trained on: "
                         f"{'; '.join(clashes)}; choose other seeds")
    return sorted(mid for mid, tr in used.items() if tr is None)
