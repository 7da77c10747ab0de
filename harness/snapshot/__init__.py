"""Archived environment snapshots: one file that holds a run's image, recipe, inputs and records.

A library in three parts; ``harness snapshot`` and ``harness rerun`` (:mod:`harness.cli.snapshot`)
only parse arguments and print what these return:

* :mod:`.manifest` -- the versioned :class:`Manifest` (schema ``harness.snapshot/1``), read and
  written there alone; every manifest an earlier harness wrote still reads;
* :mod:`.container` -- the file format: writing (:class:`SnapshotWriter`), verifying
  (:func:`verify`), reading members, and the image effects (load, package list);
* :mod:`.workflows` -- :func:`create`, :func:`verify_archive`, :func:`rerun` and :func:`rebuild`,
  each driven by a typed options object and returning a typed result.

Everything is importable from ``harness.snapshot`` itself.
"""

from __future__ import annotations

from .container import (
    BUILDARGS, BUNDLE, CHANGED, CHUNK, DATA, DATA_TREE, DOCKERFILE, ENVIRONMENT, GZIP_LEVEL, HOST_KEYS, IMAGE,
    IMAGE_SOURCES_PATH, LOCK, MANIFEST_SLOT, PACKAGES_SCRIPT, RECORD, SIGNATURE_MAX, SOURCES, Archive,
    SnapshotWriter, Verified, check_signature, disk_shortfall, extract_bundle, extract_file,
    extract_tree, host_differences, host_facts, human, image_packages, inside, load_image, member_chunks,
    now_utc, package_differences, read_json_member, read_member, snapshot_error, tar_bytes_files,
    verify, without_bytecode,
)
from ..safeio import sha256_file  # the one sha256 of a file (archived data and wheels are hashed with it)
from .manifest import (
    ALTERED, CELL_NAME, MANIFEST, READS, SCHEMA, SCHEMA_PREFIX, SIGNATURE, BuildEntry, BundleEntry, DataDir,
    DataEntry, ImageEntry, Manifest, Member, RecordEntry, manifest_digest, member_name, parse_manifest,
    plain_name, relative_path, signed_message,
)
from .workflows import (
    CreateOptions, CreateResult, RebuildOptions, RebuildResult, RerunOptions, RerunResult, SignatureStatus,
    Signers, VerifyOptions, VerifyResult, archived_cell, create, lock_entries, rebuild, rerun, signature_status,
    verify_archive,
)

__all__ = [  # the package's surface
    "BUILDARGS", "BUNDLE", "CHANGED", "CHUNK", "DATA", "DATA_TREE", "DOCKERFILE", "ENVIRONMENT", "GZIP_LEVEL",
    "HOST_KEYS", "IMAGE", "IMAGE_SOURCES_PATH", "LOCK", "MANIFEST_SLOT", "PACKAGES_SCRIPT", "RECORD",
    "SIGNATURE_MAX", "SOURCES", "Archive", "SnapshotWriter", "Verified", "check_signature",
    "disk_shortfall", "extract_bundle", "extract_file", "extract_tree", "host_differences", "host_facts", "human",
    "image_packages", "inside", "load_image", "member_chunks", "now_utc", "package_differences", "read_json_member",
    "read_member", "sha256_file", "snapshot_error", "tar_bytes_files", "verify", "without_bytecode", "ALTERED",
    "CELL_NAME", "MANIFEST", "READS", "SCHEMA", "SCHEMA_PREFIX", "SIGNATURE", "BuildEntry", "BundleEntry",
    "DataDir", "DataEntry", "ImageEntry", "Manifest", "Member", "RecordEntry", "manifest_digest", "member_name",
    "parse_manifest", "plain_name", "relative_path", "signed_message", "CreateOptions", "CreateResult",
    "RebuildOptions", "RebuildResult", "RerunOptions", "RerunResult", "SignatureStatus", "Signers", "VerifyOptions",
    "VerifyResult", "archived_cell", "create", "lock_entries", "rebuild", "rerun", "signature_status",
    "verify_archive",
]
