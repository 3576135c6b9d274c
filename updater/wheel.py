"""Build the fleetbus wheel of a given version straight from a source tree.

fleetbus is pure Python, so its wheel is a zip of the packages plus a ``dist-info``. Doing
that here, rather than through pip and a build backend, needs no network and no build
dependencies on the release machine, and stamps the bundle's version into the wheel, so
the installed agent's ``importlib.metadata`` version is the release version.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import tomllib
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_version
from packaging.version import InvalidVersion, Version

from bus.errors import UsageError

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__"}
_SUFFIXES = {".py", ".typed"}


def normalized_version(version: str) -> str:
    """The PEP 440 form of ``version``.

    Raises:
        UsageError: it is not a PEP 440 version.
    """
    try:
        return str(Version(version))
    except InvalidVersion:
        raise UsageError(f"{version!r} is not a PEP 440 version (e.g. 1.2.0)") from None


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def _package_files(source: Path, include: list[str]) -> list[Path]:
    files: list[Path] = []
    for top in sorted(source.iterdir()):
        if not (top.is_dir() and (top / "__init__.py").is_file()):
            continue
        if not any(fnmatch.fnmatchcase(top.name, pattern) for pattern in include):
            continue
        for path in sorted(top.rglob("*")):
            if path.is_file() and path.suffix in _SUFFIXES and not _SKIP_DIRS & set(path.parts):
                files.append(path)
    return files


def build_wheel(source: Path, version: str, out_dir: Path) -> Path:
    """Write ``fleetbus-<version>-py3-none-any.whl`` built from ``source`` into ``out_dir``.

    Raises:
        UsageError: ``source`` is not a fleetbus source tree, or the version is invalid.
    """
    version = normalized_version(version)
    try:
        project = tomllib.loads((source / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{source} is not a source tree with a pyproject.toml: {exc}") from None
    meta = project.get("project", {})
    if meta.get("name") != "fleetbus":
        raise UsageError(f"{source}/pyproject.toml is not fleetbus's")
    find = project.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    files = _package_files(source, find.get("include", ["*"]))
    if not files:
        raise UsageError(f"no packages found under {source}")
    dist_info = f"fleetbus-{canonicalize_version(version, strip_trailing_zero=False)}.dist-info"
    metadata = [
        "Metadata-Version: 2.1",
        "Name: fleetbus",
        f"Version: {version}",
        f"Summary: {meta.get('description', '')}",
    ]
    if "requires-python" in meta:
        metadata.append(f"Requires-Python: {meta['requires-python']}")
    metadata += [f"Requires-Dist: {dep}" for dep in meta.get("dependencies", [])]
    scripts = meta.get("scripts", {})
    entry_points = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())
    extra = {
        f"{dist_info}/METADATA": "\n".join(metadata) + "\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: fleetbus-updater\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": entry_points,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"fleetbus-{version}-py3-none-any.whl"
    record: list[str] = []
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:

        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            record.append(f"{name},{_record_hash(data)},{len(data)}")

        for path in files:
            add(path.relative_to(source).as_posix(), path.read_bytes())
        for name, text in extra.items():
            add(name, text.encode())
        record.append(f"{dist_info}/RECORD,,")
        info = zipfile.ZipInfo(f"{dist_info}/RECORD", date_time=_ZIP_DATE)
        info.external_attr = 0o644 << 16
        zf.writestr(info, "\n".join(record) + "\n")
    return wheel
