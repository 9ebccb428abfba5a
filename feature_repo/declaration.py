"""The feature declaration: a user's events' attributes, declared as data (YAML), validated here.

A declaration lists features, each an attribute of the user or the item and how it is encoded:

- ``id``: the entity's own id, hashed into 62 bits (exactly one per entity: ``user_id``, ``item_id``);
- ``vocab``: a categorical attribute with a fixed vocabulary (+ ``aliases`` folded onto it), optionally
  ``multi_valued`` (a list attribute such as genres), optionally a ``fallback`` attribute whose first
  value stands in when the attribute itself is absent;
- ``hash``: a categorical attribute of unbounded vocabulary, hashed into ``bits`` bits (optionally only
  its first ``prefix`` characters, optionally case-folded);
- ``bucketize``: a numeric attribute cut at increasing ``boundaries``;
- ``numeric``: a numeric attribute standardised as ``clip((t(x) - center) / scale, -clip, clip)``.

Why YAML and not a Python module in Feast's declarative style: a declaration is data that several
processes (the stream worker, trainers, serving, ``feast apply``) must read identically; a YAML file
executes nothing when loaded, can be chosen by a path in a setting (``RECSYS_FEATURE_SPEC``), and
pydantic validates it with errors that name the file and the field. The Feast objects themselves
stay Python (``features.py``), derived from the declaration.

This module imports pydantic and PyYAML only: it sits under the spec, on every hot path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SPECS_DIR = Path(__file__).resolve().parent / "specs"
ID_HASH_BITS = 62

Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
Attribute = Annotated[str, Field(min_length=1, max_length=128)]


class DeclarationError(ValueError):
    """A feature declaration that cannot be used; the message names the file and the field."""


class _Feature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    entity: Literal["user", "item"]
    description: str = ""


class IdFeature(_Feature):
    """The entity's own id (the row key of its embedding table in the parameter service)."""

    kind: Literal["id"]


class VocabFeature(_Feature):
    kind: Literal["vocab"]
    source: Attribute
    vocabulary: Annotated[list[str], Field(min_length=1)]
    aliases: dict[str, str] = Field(default_factory=dict)
    multi_valued: bool = False
    fallback: Attribute | None = Field(None, description="attribute whose first value is used when source is absent")

    @field_validator("vocabulary")
    @classmethod
    def _normalised_and_unique(cls, values: list[str]) -> list[str]:
        for value in values:
            if value != value.strip().lower() or not value:
                raise ValueError(f"vocabulary value {value!r} must be non-empty, lower case, without outer spaces")
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"vocabulary values appear twice: {duplicates}")
        return values

    @model_validator(mode="after")
    def _aliases_name_vocabulary_values(self) -> VocabFeature:
        for alias, target in self.aliases.items():
            if alias != alias.strip().lower():
                raise ValueError(f"alias {alias!r} must be lower case, without outer spaces (inputs are normalised)")
            if target not in self.vocabulary:
                raise ValueError(f"alias {alias!r} points to {target!r}, which is not in the vocabulary")
        return self


class HashFeature(_Feature):
    kind: Literal["hash"]
    source: Attribute
    bits: Annotated[int, Field(ge=1, le=ID_HASH_BITS)] = 16
    prefix: Annotated[int, Field(ge=1)] | None = Field(None, description="hash only the first N characters")
    case: Literal["keep", "lower", "upper"] = "lower"
    multi_valued: bool = False


class BucketizeFeature(_Feature):
    kind: Literal["bucketize"]
    source: Attribute
    boundaries: Annotated[list[int | float], Field(min_length=1)]  # ints stay ints: ages, counts
    minimum: float | None = Field(None, description="values below it count as missing")

    @field_validator("boundaries")
    @classmethod
    def _increasing(cls, values: list[int | float]) -> list[int | float]:
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"boundaries must be strictly increasing, got {values}")
        return values


class NumericFeature(_Feature):
    kind: Literal["numeric"]
    source: Attribute
    center: float = 0.0
    scale: Annotated[float, Field(gt=0)] = 1.0
    clip: Annotated[float, Field(gt=0)] = 3.0
    transform: Literal["none", "log1p"] = Field("none", description="log1p: for counts and prices (x >= 0)")


Feature = Annotated[
    IdFeature | VocabFeature | HashFeature | BucketizeFeature | NumericFeature, Field(discriminator="kind")
]


class Declaration(BaseModel):
    """One feature declaration file: every feature the model sees, in the order it sees them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1  # the file format; a second one would be read beside it, not instead
    name: Name
    description: str = ""
    features: Annotated[list[Feature], Field(min_length=2)]

    @model_validator(mode="after")
    def _consistent(self) -> Declaration:
        names = [f.name for f in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"feature names appear twice: {duplicates}")
        for entity in ("user", "item"):
            ids = [f.name for f in self.features if f.kind == "id" and f.entity == entity]
            # serving, the Feast join keys and the parameter service's row keys all name these two tables
            if ids != [f"{entity}_id"]:
                raise ValueError(f"the {entity} needs exactly one id feature named {entity}_id, got {ids}")
        return self


def _field_path(loc: tuple[int | str, ...], raw: object) -> str:
    """``features[3] (zip_prefix).bits`` rather than pydantic's ``features.3.hash.bits``."""
    parts: list[str] = []
    node = raw
    for step in loc:
        if isinstance(step, int):
            label = f"[{step}]"
            if isinstance(node, list) and step < len(node):
                node = node[step]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    label += f" ({node['name']})"
            else:
                node = None
            parts.append(label)
        elif step in ("id", "vocab", "hash", "bucketize", "numeric") and isinstance(node, dict):
            continue  # the discriminator's branch, not a field of the file
        else:
            node = node.get(step) if isinstance(node, dict) else None
            parts.append(("." if parts else "") + str(step))
    return "".join(parts) or "(top level)"


def parse_declaration(raw: object, where: str) -> Declaration:
    """A declaration from its parsed YAML; DeclarationError naming ``where`` and each bad field."""
    if not isinstance(raw, dict):
        raise DeclarationError(
            f"{where}: a feature declaration is a mapping (name, features), got {type(raw).__name__}"
        )
    try:
        return Declaration.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"{_field_path(tuple(e['loc']), raw)}: {str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors()
        ]
        raise DeclarationError(f"{where}: invalid feature declaration: " + "; ".join(problems)) from None


def declaration_path(spec: str) -> Path:
    """The file of a declaration given by name (``movielens``: ``feature_repo/specs/movielens.yaml``) or path."""
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        return Path(spec).expanduser()
    return SPECS_DIR / f"{spec}.yaml"


def available() -> list[str]:
    """The names of the declarations shipped in ``feature_repo/specs/``."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def load_declaration(spec: str) -> Declaration:
    """Read and validate the declaration named or pointed to by ``spec``."""
    import yaml

    path = declaration_path(spec)
    if not path.is_file():
        known = ", ".join(available())
        raise DeclarationError(f"no feature declaration {str(path)!r} (RECSYS_FEATURE_SPEC={spec!r}; shipped: {known})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DeclarationError(f"{path}: not valid YAML: {exc}") from None
    return parse_declaration(raw, str(path))
