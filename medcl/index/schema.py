"""What a case index stores and answers, shared by every backend (embedded FAISS+SQLite, Milvus).

A *case* is one indexed tile: its embedding (from one model version) and its metadata. The same
pydantic models validate the HTTP bodies, the CLI's input and each backend's output, so the backends
cannot drift apart in what they accept.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timezone

from pydantic import BaseModel, Field, field_validator

from medcl.errors import MedclError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class CaseIndexError(MedclError, ValueError):
    """A request the index cannot take (wrong dimension, other model version, unknown id ...)."""


class VersionMismatch(CaseIndexError):
    """Vectors from one model version offered to the index of another: never mixed."""


class DuplicateId(CaseIndexError):
    """A case id that the index already holds."""


def as_utc(value: datetime | None) -> datetime | None:
    """Naive dates are taken as UTC, so that every backend compares the same instants."""
    if value is None:
        return None
    return (value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


class CaseMetadata(BaseModel):
    """Metadata of one tile. Everything is optional; filters match on label, case, slide, site and date."""

    id: str | None = Field(None, description="Client-chosen id (letters, digits, _.:-); generated when absent")
    case_id: str | None = Field(None, max_length=256, description="Case / patient / lesion id")
    slide_id: str | None = Field(None, max_length=256)
    site: str | None = Field(None, max_length=256, description="Acquiring site or lab")
    label: str | None = Field(None, max_length=256, description="Diagnosis or class of the tile")
    # Bounded so that every index backend can store them (SQLite and Milvus integers are 64-bit).
    x: int | None = Field(None, ge=0, le=2**53, description="Tile position in the slide (pixels)")
    y: int | None = Field(None, ge=0, le=2**53)
    source_uri: str | None = Field(None, max_length=2048, description="Where the tile's image can be read again")
    date: datetime | None = Field(None, description="Date of the case (ISO 8601); filters use it")

    @field_validator("id")
    @classmethod
    def _id_format(cls, value: str | None) -> str | None:
        if value is not None and not _ID.match(value):
            raise ValueError("id must be 1-128 characters of letters, digits and _.:- starting with a letter or digit")
        return value

    _date_in_utc = field_validator("date")(classmethod(lambda cls, v: as_utc(v)))


class CaseRecord(CaseMetadata):
    id: str
    model_version: str
    added_at: datetime


class SearchFilter(BaseModel):
    """Conditions a hit must meet; all given ones at once (AND). Dates bound `date` inclusively."""

    label: str | None = None
    case_id: str | None = None
    slide_id: str | None = None
    site: str | None = None
    date_from: datetime | None = None
    date_to: datetime | None = None

    _dates_in_utc = field_validator("date_from", "date_to")(classmethod(lambda cls, v: as_utc(v)))

    def is_empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())

    def equalities(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump(include={"label", "case_id", "slide_id", "site"}).items()
                if v is not None}


class Hit(BaseModel):
    id: str
    similarity: float = Field(description="Cosine similarity of the L2-normalised embeddings")
    case: CaseRecord


class SearchResult(BaseModel):
    hits: list[Hit]
    majority_label: str | None = Field(description="Most frequent label among the hits (ties: the more similar)")
    majority_share: float | None = Field(description="Its share of the labelled hits")
    model_version: str


def majority_vote(hits: list[Hit]) -> tuple[str | None, float | None]:
    """The label most of the hits carry and its share among the labelled hits.

    Ties go to the label whose best hit ranks first, as a pathologist reading the list would."""
    labels = [h.case.label for h in hits if h.case.label is not None]
    if not labels:
        return None, None
    counts = Counter(labels)
    best = max(counts.values())
    winner = next(label for label in labels if counts[label] == best)
    return winner, best / len(labels)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
