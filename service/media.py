"""Media types: what the service reads and writes, and the choice among them by the `Accept` header."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from service.errors import NotAcceptable

JSON = "application/json"
NPY = "application/x-npy"
PNG = "image/png"
IMAGE_TYPES = (JSON, NPY, PNG)
"""What an operation returning images offers, the default first."""
ARRAY_TYPES = (JSON, NPY)
"""What an operation returning other arrays offers, the default first."""


def content_type(headers: Mapping[str, str]) -> str:
    """The media type of a request's Content-Type header, lower-cased, without parameters ("" if absent)."""
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    """ "a/b;q=0.5, c/*" -> [("a/b", 0.5), ("c/*", 1.0)] (lower-cased; a malformed q counts as 0)."""
    ranges = []
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media:
            ranges.append((media.lower(), q))
    return ranges


def negotiate(accept: str | None, offered: Sequence[str]) -> str:
    """The offered media type the client prefers; NotAcceptable if it accepts none of them.

    Each offered type takes the q of the most specific range that matches it (RFC 9110 12.5.1), so
    "image/png;q=0, */*" excludes PNG. Among equal q, an exact match beats a wildcard, then the order of
    `offered` decides: a missing header, or "*/*", gets the first (JSON).
    """
    if not accept or not accept.strip():
        return offered[0]
    ranges = _media_ranges(accept)
    best: tuple[float, int, int] | None = None
    choice = None
    for index, candidate in enumerate(offered):
        kind = candidate.split("/")[0]
        specificity, q = -1, 0.0
        for media, media_q in ranges:
            rank = 2 if media == candidate else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
            if rank > specificity:
                specificity, q = rank, media_q
        if q > 0 and (best is None or (q, specificity, -index) > best):
            best, choice = (q, specificity, -index), candidate
    if choice is None:
        raise NotAcceptable(
            f"cannot produce {accept!r}; this endpoint offers {', '.join(offered)}", field="accept"
        )
    return choice
