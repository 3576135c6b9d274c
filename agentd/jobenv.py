"""What a job's environment is made of: the agent's clean basics plus allowed names.

A job's environment is built, never merged: the agent sets the basics (``PATH``,
``HOME``, ``USER``…), then adds only the request's variables the trust file allows.
Some names are never taken from a request whatever a trust file says, because they
change what runs before the job's own code does: the dynamic loader's (``LD_*``),
shell start-up files (``BASH_ENV``, ``ENV``), interpreters' start-up hooks
(``PYTHON*``, ``PERL5*``, ``RUBYOPT``, ``NODE_OPTIONS``…) and the search path itself.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

NEVER_FROM_REQUEST: tuple[str, ...] = (
    # The dynamic loader and libc: code injection before main().
    "LD_*",
    "DYLD_*",
    "GCONV_PATH",
    "GETCONF_DIR",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_*",
    "GLIBC_TUNABLES",
    "NLSPATH",
    "RES_OPTIONS",
    "TZDIR",
    # Shells: start-up files, exported functions, word splitting, prompts that run code.
    "BASH_ENV",
    "ENV",
    "BASH_FUNC_*",
    "BASHOPTS",
    "SHELLOPTS",
    "CDPATH",
    "GLOBIGNORE",
    "IFS",
    "PS4",
    "PROMPT_COMMAND",
    # Interpreters' start-up hooks and module search paths.
    "PYTHON*",
    "PERL5*",
    "PERLLIB",
    "PERL_*",
    "RUBYOPT",
    "RUBYLIB",
    "NODE_OPTIONS",
    "NODE_PATH",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "CLASSPATH",
    "LUA_INIT*",
    "LUA_PATH*",
    "LUA_CPATH*",
    "TCLLIBPATH",
    "GIT_*",
    # Where programs are found, and what the agent itself sets for the job.
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "FLEET_*",
)
"""Names (globs) a request may never set, even if a trust file or module lists them."""


def never_from_request(name: str) -> bool:
    """Whether ``name`` (or, for a glob in a trust file, the glob itself) is forbidden.

    A trust-file entry that is itself a glob (``LD_*``) is checked as a literal name, so
    both a forbidden name and a pattern spelling one are caught.
    """
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, pattern) for pattern in NEVER_FROM_REQUEST)


def check_env_names(names: list[str]) -> list[str]:
    """Refuse names a request may never set (for trust files and module specs)."""
    bad = [n for n in names if never_from_request(n)]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} can never be set by a request (loader, shell start-up, "
            "interpreter or search-path variables); remove them from env"
        )
    return names


def build_environment(
    basics: Mapping[str, str], requested: Mapping[str, str], job_id: str
) -> dict[str, str]:
    """The job's environment: ``basics``, the allowed ``requested`` names, the job tag.

    Admission has already refused a request naming a forbidden variable; this drops
    any that got here anyway, so the basics always win.
    """
    env = dict(basics)
    env.update({k: v for k, v in requested.items() if not never_from_request(k)})
    # Marks every process of the job, so even a reparented straggler is recognisable.
    env["FLEET_JOB_ID"] = job_id
    return env
