"""An agent's install root: versioned directories beside each other, one ``current`` link.

::

    ROOT/versions/<version>/site/      the unpacked wheels (PYTHONPATH of that agent)
    ROOT/versions/<version>/manifest.json
    ROOT/current -> versions/<version>  switched atomically (rename of a new link)
    ROOT/pending.json                   an update waiting for its health check
    ROOT/rolled_back.json               the launcher restored the previous version; why
    ROOT/failed.json                    versions that failed here, per announcement

No ``current`` link means the base installation (the one the launcher runs from).
Config, identity, journal and data never live in a version directory (they stay in the
agent's config file and ``data_dir``), so a switch carries them over by not moving them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import logging
import os
import platform
import shutil
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

from bus.errors import BundleError
from updater.bundle import Bundle

logger = logging.getLogger(__name__)

_KEEP_VERSIONS = 3


@dataclass(frozen=True)
class Pending:
    """An update that switched ``current`` and waits for the new agent to be healthy."""

    version: str
    previous: str | None
    previous_version: str
    announcement: str


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.error("%s is unreadable (%s); ignoring it", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


class InstallRoot:
    """The files of one agent's installations (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        root = root.resolve()
        self.root = root
        self.versions = root / "versions"
        self.current = root / "current"
        self.pending_file = root / "pending.json"
        self.rolled_back_file = root / "rolled_back.json"
        self.failed_file = root / "failed.json"

    # --- what is installed ------------------------------------------------------------

    def current_dir(self) -> Path | None:
        """The running version's directory; None for the base installation."""
        try:
            target = os.readlink(self.current)
        except FileNotFoundError:
            return None
        return (self.root / target).resolve()

    def site_of(self, version_dir: Path | None) -> Path | None:
        return None if version_dir is None else version_dir / "site"

    def manifest_of(self, version_dir: Path | None) -> dict[str, Any] | None:
        """The manifest installed with ``version_dir`` (None for the base installation)."""
        return None if version_dir is None else _read_json(version_dir / "manifest.json")

    def version_of(self, version_dir: Path | None) -> str | None:
        """The version installed in ``version_dir`` (None for the base installation)."""
        manifest = self.manifest_of(version_dir)
        return str(manifest["version"]) if manifest and "version" in manifest else None

    # --- installing -------------------------------------------------------------------

    def install(self, bundle: Bundle) -> Path:
        """Unpack a verified bundle into ``versions/<version>``; returns that directory.

        Installs beside the running version, never over it: the directory is built under
        a temporary name and renamed into place.

        Raises:
            BundleError: (stage ``install``) the Python version or a dependency does not
                fit, a wheel is malformed, or the disk refused.
        """
        check_requirements(bundle)
        self.versions.mkdir(parents=True, exist_ok=True)
        final = self.versions / bundle.version
        if final == self.current_dir():
            raise BundleError(f"{bundle.version} is the running version", "install")
        staging = self.versions / f".{bundle.version}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            site = staging / "site"
            site.mkdir(parents=True)
            for name, data in sorted(bundle.wheels().items()):
                _unpack_wheel(name, data, site)
            (staging / "manifest.json").write_bytes(bundle.manifest.canonical())
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
        except OSError as exc:
            raise BundleError(f"cannot install into {final}: {exc}", "install") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def switch(self, version_dir: Path | None) -> None:
        """Point ``current`` at ``version_dir`` (None: the base) in one atomic step."""
        if version_dir is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.current)
            return
        link = self.root / f".current.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        os.symlink(os.path.relpath(version_dir, self.root), link)
        os.replace(link, self.current)

    def prune(self) -> list[str]:
        """Remove all but the newest few version directories (never the running one)."""
        if not self.versions.is_dir():
            return []
        keep = {self.current_dir()}
        dirs = sorted(
            (d for d in self.versions.iterdir() if d.is_dir() and not d.name.startswith(".")),
            key=lambda d: d.stat().st_mtime,
            reverse=True,
        )
        removed = []
        for d in dirs[_KEEP_VERSIONS:]:
            if d.resolve() not in keep:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed

    # --- the update's state across the restart ----------------------------------------

    def write_pending(self, pending: Pending) -> None:
        _write_json(self.pending_file, vars(pending))

    def pending(self) -> Pending | None:
        doc = _read_json(self.pending_file)
        if doc is None:
            return None
        try:
            return Pending(**doc)
        except TypeError:
            logger.error("%s has an unexpected shape; ignoring it", self.pending_file)
            return None

    def clear_pending(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pending_file)

    def write_rolled_back(self, pending: Pending, reason: str) -> None:
        _write_json(self.rolled_back_file, {**vars(pending), "reason": reason})

    def take_rolled_back(self) -> dict[str, Any] | None:
        """The launcher's record of a rollback, removed once read."""
        doc = _read_json(self.rolled_back_file)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.rolled_back_file)
        return doc

    def failed(self) -> dict[str, dict[str, str]]:
        """Version → ``{"announcement", "reason"}`` of the versions that failed here."""
        doc = _read_json(self.failed_file) or {}
        return {k: v for k, v in doc.items() if isinstance(v, dict)}

    def remember_failure(self, version: str, announcement: str, reason: str) -> None:
        failed = self.failed()
        failed[version] = {"announcement": announcement, "reason": reason}
        _write_json(self.failed_file, failed)


def check_requirements(bundle: Bundle) -> None:
    """Refuse a bundle this interpreter cannot run.

    Raises:
        BundleError: (stage ``install``) the Python version is outside the bundle's
            ``Requires-Python``, or a dependency is neither bundled nor installed in a
            fitting version.
    """
    python = platform.python_version()
    manifest = bundle.manifest
    try:
        if manifest.python_requires and python not in SpecifierSet(manifest.python_requires):
            raise BundleError(
                f"needs Python {manifest.python_requires}, this is {python}", "install"
            )
    except InvalidSpecifier:
        raise BundleError(f"bad Requires-Python {manifest.python_requires!r}", "install") from None
    bundled: dict[str, str] = {}
    for name in bundle.wheels():
        dist, version, _, _ = parse_wheel_filename(PurePosixPath(name).name)
        bundled[str(dist)] = str(version)
    for text in manifest.requires:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            raise BundleError(f"bad requirement {text!r}", "install") from None
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        have = bundled.get(name)
        if have is None:
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                raise BundleError(
                    f"needs {text}, which is neither in the bundle nor installed", "install"
                ) from None
        if not req.specifier.contains(have, prereleases=True):
            raise BundleError(f"needs {text}; {name} {have} is what there is", "install")


def _unpack_wheel(name: str, data: bytes, site: Path) -> None:
    """Install a wheel's files into ``site`` as pip would for a target directory."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                parts = PurePosixPath(info.filename).parts
                if info.is_dir():
                    continue
                if not parts or parts[0] in ("/", "..") or ".." in parts:
                    raise BundleError(f"{name}: unsafe path {info.filename!r}", "install")
                if parts[0].endswith(".data"):
                    # purelib/platlib go to site; scripts, headers and data are not needed
                    # to run the agent (the launcher runs `python -m agentd`).
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                dest = site.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(info))
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{name} is not a wheel: {exc}", "install") from None


def purge(data_dir: Path, globs: list[str], keep: Collection[Path] = ()) -> list[str]:
    """Remove what a new version's manifest says it no longer wants under ``data_dir``.

    Never what is in ``keep`` nor a directory holding it: a ``purge = ["*"]`` in a signed
    bundle must not take the agent's identity, journal or used seals with it (the
    journal and the seals are what keep a job from running twice).
    """
    removed: list[str] = []
    if not globs or not data_dir.is_dir():
        return removed
    kept = {Path(os.path.abspath(k)) for k in keep}
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir).as_posix()
        absolute = Path(os.path.abspath(path))
        if absolute in kept or any(absolute in k.parents for k in kept):
            continue
        if any(fnmatch.fnmatchcase(rel, g) for g in globs) and path.exists():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(rel)
    return removed
