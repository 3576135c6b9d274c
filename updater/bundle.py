"""Update bundles: a tar of wheels, a manifest with every file's digest, and a signature.

Layout (an uncompressed tar; the wheels are compressed already)::

    manifest.json     BundleManifest, the exact bytes that are signed
    signature.json    BundleSignature: release key and ed25519 signature
    wheels/*.whl      the fleetbus wheel and any dependency wheels

:func:`open_bundle` is the one place a bundle is trusted: it checks the signature
against the caller's release keys, then every member against the manifest, and refuses
members the manifest does not name. Nothing is unpacked before that.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import time
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from pydantic import ValidationError

from bus.errors import BundleError, SignatureError, UsageError
from bus.signing import Signer, verify_signature
from schemas.update import BundleManifest, BundleSignature
from updater.wheel import normalized_version

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
MAX_BUNDLE_BYTES = 512 * 1024 * 1024
_TAR_MTIME = 0


@dataclass(frozen=True)
class Bundle:
    """A bundle whose signature and digests were checked."""

    manifest: BundleManifest
    release_key: str
    files: dict[str, bytes]

    @property
    def version(self) -> str:
        return self.manifest.version

    def wheels(self) -> dict[str, bytes]:
        return {name: data for name, data in self.files.items() if name.endswith(".whl")}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_metadata(data: bytes, name: str) -> tuple[str, str, list[str]]:
    """(version, Requires-Python, Requires-Dist) of a wheel."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(zf.read(meta_name).decode())
    except (zipfile.BadZipFile, StopIteration, UnicodeDecodeError) as exc:
        raise UsageError(f"{name} is not a wheel: {exc or 'no METADATA'}") from None
    return (
        meta.get("Version", ""),
        meta.get("Requires-Python", ""),
        meta.get_all("Requires-Dist") or [],
    )


def build_bundle(
    version: str,
    wheels: list[Path],
    signer: Signer | None,
    *,
    build: str = "",
    purge: Collection[str] = (),
) -> bytes:
    """The bytes of a bundle of ``wheels``, signed by ``signer`` (None: unsigned).

    Raises:
        UsageError: no fleetbus wheel of ``version`` among ``wheels``, or duplicates.
    """
    version = normalized_version(version)
    files: dict[str, bytes] = {}
    ours: tuple[str, list[str]] | None = None
    for path in wheels:
        try:
            name, wheel_version, _, _ = parse_wheel_filename(path.name)
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from None
        member = f"wheels/{path.name}"
        if member in files:
            raise UsageError(f"{path.name} is given twice")
        files[member] = path.read_bytes()
        if name == canonicalize_name("fleetbus"):
            if str(wheel_version) != version:
                raise UsageError(f"{path.name} is fleetbus {wheel_version}, not {version}")
            _, python_requires, requires = _wheel_metadata(files[member], path.name)
            ours = (python_requires, requires)
    if ours is None:
        raise UsageError(f"no fleetbus {version} wheel among the bundle's wheels")
    manifest = BundleManifest(
        version=version,
        build=build,
        created_ns=time.time_ns(),
        python_requires=ours[0],
        requires=ours[1],
        files={name: sha256_hex(data) for name, data in sorted(files.items())},
        purge=sorted(purge),
    )
    members = {MANIFEST: manifest.canonical(), **files}
    if signer is not None:
        signature = BundleSignature(
            release_key=signer.public_key,
            sig=base64.urlsafe_b64encode(signer.sign(members[MANIFEST])).decode(),
        )
        members[SIGNATURE] = signature.model_dump_json().encode()
    return _tar(members)


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members, key=lambda n: (n != MANIFEST, n != SIGNATURE, n)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), _TAR_MTIME, 0o644
            tar.addfile(info, io.BytesIO(members[name]))
    return out.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle of {len(data)} bytes exceeds {MAX_BUNDLE_BYTES}")
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    raise BundleError(f"bundle member {info.name!r} is not a regular file")
                if info.name in members:
                    raise BundleError(f"bundle member {info.name!r} appears twice")
                extracted = tar.extractfile(info)
                assert extracted is not None  # a regular file always has data
                members[info.name] = extracted.read()
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"not a bundle (a tar archive): {exc}") from None
    return members


def open_bundle(data: bytes, trusted_keys: Collection[str]) -> Bundle:
    """Check a bundle and return its contents.

    Raises:
        BundleError: unsigned, signed by a key not in ``trusted_keys``, a bad signature,
            a member missing, extra or not matching its digest, or a malformed manifest.
    """
    members = _members(data)
    raw_manifest = members.pop(MANIFEST, None)
    raw_signature = members.pop(SIGNATURE, None)
    if raw_manifest is None:
        raise BundleError("bundle has no manifest.json")
    if raw_signature is None:
        raise BundleError("bundle is unsigned")
    try:
        signature = BundleSignature.model_validate_json(raw_signature)
    except ValidationError as exc:
        raise BundleError(f"signature.json is malformed: {exc.error_count()} errors") from None
    if signature.release_key not in trusted_keys:
        raise BundleError(f"bundle is signed by {signature.release_key}, not a trusted release key")
    try:
        verify_signature(
            signature.release_key, raw_manifest, base64.urlsafe_b64decode(signature.sig)
        )
    except (SignatureError, ValueError) as exc:
        raise BundleError(f"bundle signature: {exc}") from None
    try:
        manifest = BundleManifest.model_validate_json(raw_manifest)
    except ValidationError as exc:
        raise BundleError(f"manifest.json is malformed: {exc.error_count()} errors") from None
    extra = sorted(set(members) - set(manifest.files))
    if extra:
        raise BundleError(f"bundle has members its manifest does not list: {', '.join(extra)}")
    for name, digest in manifest.files.items():
        if name not in members:
            raise BundleError(f"bundle lacks {name}, which its manifest lists")
        if sha256_hex(members[name]) != digest:
            raise BundleError(f"{name} does not match its digest in the manifest (tampered?)")
    return Bundle(manifest=manifest, release_key=signature.release_key, files=members)


def inspect_bundle(data: bytes) -> Bundle:
    """Check a bundle against the key it names itself (for publishing, not for trust).

    Raises:
        BundleError: as :func:`open_bundle`, but any valid signature is accepted.
    """
    members = _members(data)
    raw = members.get(SIGNATURE)
    if raw is None:
        raise BundleError("bundle is unsigned")
    try:
        key = BundleSignature.model_validate_json(raw).release_key
    except ValidationError as exc:
        raise BundleError(f"signature.json is malformed: {exc.error_count()} errors") from None
    return open_bundle(data, {key})
