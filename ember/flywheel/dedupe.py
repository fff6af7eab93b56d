"""Duplicate prompts out of a dataset: exact ones by the hash of the normalised text, near ones by MinHash
over character shingles with an LSH index (datasketch), confirmed by the estimated Jaccard similarity.

Items are taken in the caller's order of preference and an item is dropped when one already kept is its
duplicate, so of each group the most preferred survives.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from datasketch import MinHash, MinHashLSH

T = TypeVar("T")
# The LSH index only proposes candidates, which the estimate then confirms; above this threshold it cannot
# split the signature into the two or more bands it needs, so it proposes from here.
MAX_LSH_THRESHOLD = 0.85
SCHEME = "affine32"  # datasketch 2's default permutation scheme, named: signatures must share one
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class DedupeConfig:
    """`near_threshold`: the estimated Jaccard similarity of shingle sets at which two prompts are near
    duplicates (None: exact duplicates only); `shingle`: characters a shingle; `num_perm`: MinHash
    permutations (more: a closer estimate, slower)."""

    near_threshold: float | None = 0.8
    shingle: int = 5
    num_perm: int = 128

    def __post_init__(self):
        if self.near_threshold is not None and not 0.0 < self.near_threshold <= 1.0:
            raise ValueError("near_threshold must be in (0, 1], or None for exact duplicates only")
        if not 1 <= self.shingle <= 64:
            raise ValueError(f"shingle must be 1..64 characters (got {self.shingle})")
        if not 16 <= self.num_perm <= 1024:
            raise ValueError(f"num_perm must be 16..1024 (got {self.num_perm})")


@dataclass
class Deduped:
    kept: list
    exact: int = 0  # dropped as exact duplicates of a kept item
    near: int = 0  # dropped as near duplicates


def normalise(text: str) -> str:
    """What two prompts must share to be the same: NFKC, case-folded, whitespace runs as one space."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def shingles(text: str, k: int) -> set[bytes]:
    """The character k-grams of `text` (the text itself when shorter)."""
    data = text.encode()
    if len(text) <= k:
        return {data}
    return {text[i : i + k].encode() for i in range(len(text) - k + 1)}


def dedupe(items: Sequence[T], text: Callable[[T], str], config: DedupeConfig) -> Deduped:
    """`items` without exact and near duplicates of `text(item)`, in their order."""
    out = Deduped([])
    seen: set[str] = set()
    lsh = proto = None
    if config.near_threshold is not None:
        lsh = MinHashLSH(threshold=min(config.near_threshold, MAX_LSH_THRESHOLD), num_perm=config.num_perm)
        # One set of permutations for every signature (making them is most of a MinHash's cost).
        proto = MinHash(num_perm=config.num_perm, scheme=SCHEME)
    signatures: dict[str, MinHash] = {}
    for item in items:
        norm = normalise(text(item))
        digest = hashlib.sha256(norm.encode()).hexdigest()
        if digest in seen:
            out.exact += 1
            continue
        if lsh is not None:
            sig = MinHash(num_perm=config.num_perm, permutations=proto.permutations, scheme=SCHEME)
            sig.update_batch(list(shingles(norm, config.shingle)))
            # LSH gives candidates (false positives included): the estimate decides.
            if any(sig.jaccard(signatures[key]) >= config.near_threshold for key in lsh.query(sig)):
                out.near += 1
                continue
            lsh.insert(digest, sig)
            signatures[digest] = sig
        seen.add(digest)
        out.kept.append(item)
    return out
