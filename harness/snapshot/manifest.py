"""The snapshot manifest: the one document of an archive that must stay readable for years.

:class:`Manifest` is read and written here and nowhere else. Its schema is
``harness.snapshot/1``; every manifest any harness version wrote under it is still read:

* the first manifests (no ``record.schema``; ``data`` without ``kind`` or ``dir``),
* from SSH signatures on: ``record.schema`` (the archived record's schema),
* from directory data and ``--data-dir`` on: ``data.kind`` (``file`` or ``directory``) and, for a
  run with ``--data-dir``, ``data.dir`` (``name``, ``sha256``, ``in_dir``).

A key this version does not know is kept (``extra``) and written back as it was: the
manifest is signed as read, and a newer harness of the same schema may add keys. Another
schema version is refused in one line naming the file (:func:`Manifest.from_json`).

Reading is hostile-input safe: the shape (types, required keys) is checked before any
value is used, and every name that becomes a path (``cell``, ``bundle.name``, ``data.file``,
``data.dir.name``, ``data.dir.in_dir``, member names) must be a plain name. Every refusal
is one :class:`~harness.errors.InputError` (exit 2) naming the key.

The digest (``manifest_sha256``) and the signed message are computed over the document as
read (:func:`manifest_digest`, :func:`signed_message`), never over a re-serialisation.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

from ..errors import InputError

SCHEMA = "harness.snapshot/1"
SCHEMA_PREFIX = "harness.snapshot/"
READS = (SCHEMA,)  # every schema this harness reads (one so far: keys were only ever added under /1)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CELL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,100}$")  # harness.images.matrix's cell names (a directory name here)
ALTERED = "the archive was altered or was not written by harness; do not use it"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def signed_message(manifest: Mapping[str, Any]) -> bytes:
    """What a snapshot's signature signs: the manifest's canonical JSON, its digest included."""
    return _canonical(manifest)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256``."""
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "manifest_sha256"})).hexdigest()


# ------------------------------------------------------------------------------ the manifest's shape


def _bad(where: str, key: str, problem: str) -> InputError:
    return InputError(where, f"{MANIFEST}: key {key} {problem}", hint=ALTERED)


def plain_name(value: Any, where: str, key: str) -> str:
    """A name that becomes one path component: no ``/``, not ``.``/``..``, no NUL, not empty."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value \
            or "\0" in value or len(value) > 255:
        raise _bad(where, key, f"is not a plain file name ({value!r})")
    return value


def relative_path(value: str, where: str, key: str) -> str:
    """A ``/``-separated path below a directory: plain components, or ``.`` for the directory itself."""
    if value == ".":
        return value
    if not value or len(value) > 4096 or value.startswith("/"):
        raise _bad(where, key, f"is not a relative path ({value[:120]!r})")
    for part in value.split("/"):
        plain_name(part, where, key)
    return value


def member_name(value: Any, where: str, key: str) -> str:
    """A member name of the outer tar: relative, each component plain, at most 100 characters."""
    if not isinstance(value, str) or not value or len(value) > 100 or value in (MANIFEST, SIGNATURE):
        raise _bad(where, key, f"is not a member name ({value!r})")
    for part in value.split("/"):
        if not part or part in (".", "..") or "\0" in part or "\\" in part:
            raise _bad(where, key, f"is not a member name inside the archive ({value!r})")
    return value


def _typed(obj: dict[str, Any], key: str, types: tuple[type, ...], where: str, path: str, *, required: bool) -> Any:
    if key not in obj:
        if required:
            raise _bad(where, path, "is missing")
        return None
    value = obj[key]
    if type(value) not in types:  # bool is not an int here
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise _bad(where, path, f"is {type(value).__name__ if value is not None else 'null'}, expected {names}")
    return value


def _hex64(obj: dict[str, Any], key: str, where: str, path: str, *, required: bool = True) -> None:
    value = _typed(obj, key, (str,), where, path, required=required)
    if value is not None and not _HEX64.match(value):
        raise _bad(where, path, f"is not a sha256 ({value[:80]!r})")


def _check_shape(m: dict[str, Any], where: str) -> None:
    """Everything a reader of the manifest relies on, checked once; the first problem is an InputError."""
    members = _typed(m, "members", (list,), where, "members", required=True)
    names: set[str] = set()
    for i, e in enumerate(members):
        at = f"members[{i}]"
        if not isinstance(e, dict):
            raise _bad(where, at, "is not an object")
        name = member_name(_typed(e, "name", (str,), where, f"{at}.name", required=True), where, f"{at}.name")
        if name in names:
            raise _bad(where, f"{at}.name", f"lists member {name} twice")
        names.add(name)
        for key, required in (("size", True), ("raw_size", False)):
            n = _typed(e, key, (int,), where, f"{at}.{key}", required=required)
            if n is not None and n < 0:
                raise _bad(where, f"{at}.{key}", f"is negative ({n})")
        _hex64(e, "sha256", where, f"{at}.sha256")
        _hex64(e, "raw_sha256", where, f"{at}.raw_sha256", required=False)
        if ("raw_size" in e) != ("raw_sha256" in e):
            raise _bad(where, at, "has only one of raw_size and raw_sha256")
        _typed(e, "compression", (str,), where, f"{at}.compression", required=False)
    cell = _typed(m, "cell", (str,), where, "cell", required=True)
    if not CELL_NAME.match(cell):
        raise _bad(where, "cell", f"is not a matrix cell name ({cell[:120]!r})")
    image = _typed(m, "image", (dict,), where, "image", required=True)
    if not _typed(image, "id", (str,), where, "image.id", required=True):
        raise _bad(where, "image.id", "is empty")
    for key in ("tag", "input_hash"):
        _typed(image, key, (str, type(None)), where, f"image.{key}", required=False)
    bundle = _typed(m, "bundle", (dict,), where, "bundle", required=True)
    plain_name(_typed(bundle, "name", (str,), where, "bundle.name", required=True), where, "bundle.name")
    data = _typed(m, "data", (dict,), where, "data", required=True)
    plain_name(_typed(data, "file", (str,), where, "data.file", required=True), where, "data.file")
    _typed(data, "included", (bool,), where, "data.included", required=True)
    _hex64(data, "sha256", where, "data.sha256")
    _typed(data, "path", (str, type(None)), where, "data.path", required=False)
    kind = _typed(data, "kind", (str,), where, "data.kind", required=False)
    if kind is not None and kind not in ("file", "directory"):
        raise _bad(where, "data.kind", f"is neither file nor directory ({kind[:40]!r})")
    around = _typed(data, "dir", (dict,), where, "data.dir", required=False)
    if around is not None:
        plain_name(_typed(around, "name", (str,), where, "data.dir.name", required=True), where, "data.dir.name")
        _hex64(around, "sha256", where, "data.dir.sha256")
        relative_path(_typed(around, "in_dir", (str,), where, "data.dir.in_dir", required=True), where, "data.dir.in_dir")
    for key in ("cell_spec", "host", "build", "record"):
        _typed(m, key, (dict,), where, key, required=False)
    for key in ("created", "harness_version"):
        _typed(m, key, (str, type(None)), where, key, required=False)


def _check_values(m: dict[str, Any], where: str) -> None:
    """The keys :class:`Manifest` types that no reader used to rely on: refused when of another type."""
    image = m["image"]
    _typed(image, "size", (int, type(None)), where, "image.size", required=False)
    digests = _typed(image, "repo_digests", (list, type(None)), where, "image.repo_digests", required=False)
    for i, d in enumerate(digests or ()):
        _typed({"d": d}, "d", (str,), where, f"image.repo_digests[{i}]", required=True)
    data = m["data"]
    _typed(data, "size", (int, type(None)), where, "data.size", required=False)
    _typed(data, "config_path", (str, type(None)), where, "data.config_path", required=False)
    build = m.get("build")
    if build is not None:
        _typed(build, "recipe_matches_image", (bool, type(None)), where, "build.recipe_matches_image", required=False)
        _typed(build, "input_hash", (str, type(None)), where, "build.input_hash", required=False)
    record = m.get("record")
    if record is not None:
        for key in ("cell", "weights_sha256", "status", "schema"):
            _typed(record, key, (str, type(None)), where, f"record.{key}", required=False)


def _check_schema(data: Any, where: str) -> dict[str, Any]:
    """``data`` when it is a manifest of a schema this harness reads; one line otherwise."""
    if not isinstance(data, dict):
        raise InputError(where, f"{MANIFEST} is not a snapshot manifest (a JSON {type(data).__name__}, not an object)")
    schema = data.get("schema")
    if schema not in READS or not isinstance(schema, str):
        if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
            raise InputError(where, f"has schema {schema}, this harness reads {' and '.join(READS)}",
                             hint="upgrade harness to read it")
        raise InputError(where, f"is not a harness snapshot ({MANIFEST} schema {str(schema)[:80]!r})")
    return data


# ------------------------------------------------------------------------------ the typed manifest


class _Entry:
    """A manifest object: its known keys as fields, every other key in ``extra`` (written back as read).

    ``_OMIT_NONE`` names the keys older manifests lack: left out when None, so that such a
    manifest writes back as it was read. Every other key is always written (null when None).
    """

    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in self._OMIT_NONE:
                continue
            out[f.name] = _plain(value)
        extra = getattr(self, "extra", None) or {}
        out.update({k: v for k, v in extra.items() if k not in out})
        return out

    @classmethod
    def _from(cls, obj: Mapping[str, Any], **values: Any) -> Any:
        known = {f.name for f in fields(cls)} - {"extra"}  # type: ignore[arg-type]
        kwargs = {k: obj[k] for k in known if k in obj}
        kwargs.update(values)
        return cls(**kwargs, extra={k: v for k, v in obj.items() if k not in known})


def _plain(value: Any) -> Any:
    if isinstance(value, _Entry):
        return value.to_json()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Member(_Entry):
    """One archive member: ``size``/``sha256`` of the stored (gzip) bytes, ``raw_*`` of its content."""

    name: str
    size: int
    sha256: str
    raw_size: int | None = None
    raw_sha256: str | None = None
    compression: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"raw_size", "raw_sha256", "compression"})


@dataclass(frozen=True)
class ImageEntry(_Entry):
    """The archived image: its id (what a load must produce), its tag and input hash."""

    id: str
    tag: str | None = None
    size: int | None = None
    repo_digests: tuple[str, ...] = ()
    input_hash: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildEntry(_Entry):
    """Whether this checkout's recipe hashed to the image's input hash when the snapshot was made."""

    recipe_matches_image: bool | None = None
    input_hash: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BundleEntry(_Entry):
    """The optuna_best directory's name (the top directory of member ``bundle.tar.gz``)."""

    name: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataDir(_Entry):
    """For a run with ``--data-dir``: the directory around the data and where the data lay inside it."""

    name: str
    sha256: str
    in_dir: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataEntry(_Entry):
    """The data the run trained on: its digest, and whether the archive holds it."""

    file: str
    sha256: str
    included: bool
    path: str | None = None
    config_path: str | None = None
    size: int | None = None
    kind: str | None = None  # "file" | "directory"; None in manifests older than directory data (a file)
    dir: DataDir | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"kind", "dir"})

    @property
    def is_tree(self) -> bool:
        """Whether the data travels as a directory (member ``data.tar.gz``)."""
        return self.dir is not None or self.kind == "directory"


@dataclass(frozen=True)
class RecordEntry(_Entry):
    """A summary of the archived record (member ``record.json.gz`` holds the record itself)."""

    cell: str | None = None
    weights_sha256: str | None = None
    status: str | None = None
    schema: str | None = None  # absent in manifests older than signatures
    extra: Mapping[str, Any] = field(default_factory=dict)
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"schema"})


@dataclass(frozen=True)
class Manifest(_Entry):
    """A snapshot's manifest, typed. ``to_json``/``from_json`` are the only writer and reader.

    ``members`` and ``manifest_sha256`` are filled in by :meth:`SnapshotWriter.finish
    <harness.snapshot.container.SnapshotWriter.finish>`, which knows them only at the end.
    """

    cell: str
    image: ImageEntry
    bundle: BundleEntry
    data: DataEntry
    harness_version: str | None = None
    created: str | None = None
    cell_spec: Mapping[str, Any] | None = None  # harness.images.matrix.ImageCell as a dict
    build: BuildEntry | None = None
    record: RecordEntry | None = None
    host: Mapping[str, Any] | None = None  # harness.snapshot.container.host_facts() where it was made
    members: tuple[Member, ...] = ()
    schema: str = SCHEMA
    manifest_sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"harness_version", "created", "cell_spec", "build", "record",
                                                      "host", "manifest_sha256"})

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def body(self) -> dict[str, Any]:
        """What :meth:`SnapshotWriter.finish` completes: everything but schema, members and digest."""
        return {k: v for k, v in self.to_json().items() if k not in ("schema", "members", "manifest_sha256")}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Manifest":
        """A manifest of a schema this harness reads, its shape checked; any problem is one InputError naming ``where``."""
        m = _check_schema(data, where)
        _check_shape(m, where)
        _check_values(m, where)
        data_in = m["data"]
        around = data_in.get("dir")
        return cls._from(
            m,
            image=ImageEntry._from(m["image"], repo_digests=tuple(m["image"].get("repo_digests") or ())),
            bundle=BundleEntry._from(m["bundle"]),
            data=DataEntry._from(data_in, dir=DataDir._from(around) if around is not None else None),
            build=BuildEntry._from(m["build"]) if m.get("build") is not None else None,
            record=RecordEntry._from(m["record"]) if m.get("record") is not None else None,
            members=tuple(Member._from(e) for e in m["members"]),
        )


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Check a manifest's schema, its own checksum and its shape; the first problem is an InputError.

    Returns the document as read (what the digest and a signature cover); :meth:`Manifest.from_json`
    of it is the typed view.
    """
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(where, f"{MANIFEST} is damaged (not valid JSON)", hint="the archive cannot be trusted") from None
    _check_schema(manifest, where)
    try:
        digest = manifest_digest(manifest)
    except (ValueError, RecursionError):
        digest = None
    if manifest.get("manifest_sha256") != digest:
        raise InputError(where, f"{MANIFEST} is damaged (its checksum does not match its content)",
                         hint="the archive cannot be trusted")
    Manifest.from_json(manifest, where)
    return manifest
