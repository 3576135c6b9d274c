"""Shell completion scripts and man pages, generated from the commands' own parsers.

Nothing here is written by hand, so neither can drift from what the commands accept:
``fleet completion bash|zsh|tcsh|fish`` prints a completion script (bash, zsh and tcsh
through shtab; fish, which shtab does not speak, from the same parser walk the man pages
use), and ``python -m fleet.shell --write-man DIR`` renders the man pages the package
installs (``man/`` in the source tree; a test fails when they are stale).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bus.command import fleetbus_version

SHELLS = ("bash", "zsh", "tcsh", "fish")


def _parsers() -> dict[str, tuple[int, Callable[[], argparse.ArgumentParser]]]:
    """Every installed command: its man section and its parser (imported lazily)."""
    from agentd.cli import build_parser as agentd_parser
    from fleet.cli import build_parser as fleet_parser
    from headless.cli import build_parser as headless_parser
    from master.cli import build_parser as master_parser
    from updater.launcher import build_parser as launcher_parser

    return {
        "fleet": (1, fleet_parser),
        "fleet-headless": (1, headless_parser),
        "fleet-agentd": (8, agentd_parser),
        "fleet-agentd-launcher": (8, launcher_parser),
        "fleet-master": (8, master_parser),
    }


COMMANDS = ("fleet", "fleet-headless", "fleet-agentd", "fleet-agentd-launcher", "fleet-master")


def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser of one installed command.

    Raises:
        KeyError: not a fleetbus command.
    """
    return _parsers()[command][1]()


def _subcommands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, help, parser)`` of each subcommand, depth first, names joined by spaces."""
    for action in parser._actions:  # argparse offers no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub
                for deeper, text, parser_ in _subcommands(sub):
                    yield f"{name} {deeper}", text, parser_


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            yield action


# --- completion ---------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fleet completion SHELL [COMMAND]``."""
    p = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print the completion script of a fleetbus command for a shell, e.g. "
        "`fleet completion bash > /etc/bash_completion.d/fleet`, "
        "`fleet completion zsh > ~/.zfunc/_fleet`, "
        "`fleet completion fish > ~/.config/fish/completions/fleet.fish`.",
    )
    p.add_argument("shell", choices=SHELLS, help="the shell")
    p.add_argument(
        "for_command",
        nargs="?",
        default="fleet",
        choices=COMMANDS,
        metavar="COMMAND",
        help=f"whose completion (default fleet): {', '.join(COMMANDS)}",
    )
    p.set_defaults(handler=_print_completion)


def _print_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion(args.for_command, args.shell))
    return 0


def completion(command: str, shell: str) -> str:
    """The completion script of ``command`` for ``shell``.

    Raises:
        ValueError: a shell this cannot write for.
    """
    parser = parser_of(command)
    if shell == "fish":
        return _fish(command, parser)
    if shell not in SHELLS:
        raise ValueError(f"no completion for {shell}: use one of {', '.join(SHELLS)}")
    import shtab  # only this command needs it

    return str(shtab.complete(parser, shell=shell))


def _fish(command: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"# fish completion for {command}, generated from its parser by fleetbus"]
    lines.append(f"complete -c {command} -f")
    top = [(n, h, p) for n, h, p in _subcommands(parser) if " " not in n]
    if top:
        names = " ".join(n for n, _, _ in top)
        for name, text, _ in top:
            lines.append(
                f"complete -c {command} -n 'not __fish_seen_subcommand_from {names}' "
                f"-a {name} -d {_fish_quote(text)}"
            )
    scopes = [("", parser), *((n, p) for n, _, p in top)]
    for scope, sub in scopes:
        condition = f" -n '__fish_seen_subcommand_from {scope}'" if scope else ""
        for action in _options(sub):
            flags = ""
            for option in action.option_strings:
                if option.startswith("--"):
                    flags += f" -l {option[2:]}"
                elif len(option) == 2:
                    flags += f" -s {option[1]}"
            takes = " -r" if action.nargs != 0 else ""
            choices = (
                f" -a {_fish_quote(' '.join(map(str, action.choices)))}" if action.choices else ""
            )
            lines.append(
                f"complete -c {command}{condition}{flags}{takes}{choices} "
                f"-d {_fish_quote(action.help or '')}"
            )
    return "\n".join(lines) + "\n"


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- man pages ----------------------------------------------------------------------------


def _roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line read as a request."""
    out = []
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # groff reads ASCII: anything else by its code point (… is \[u2026]).
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    for line in text.splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _expand(parser: argparse.ArgumentParser, text: str | None) -> str:
    """A help string with argparse's ``%(prog)s``/``%(default)s`` style left as words."""
    return (text or "").replace("%(prog)s", parser.prog).replace("%%", "%")


def _option_block(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in _options(parser):
        metavar = ""
        if action.nargs != 0:
            shown = action.metavar or (
                "{" + ",".join(map(str, action.choices)) + "}"
                if action.choices
                else action.dest.upper()
            )
            metavar = f" \\fI{_roff(str(shown))}\\fR"
        flags = ", ".join(f"\\fB{_roff(o)}\\fR{metavar}" for o in action.option_strings)
        lines += [
            ".TP",
            flags,
            _roff(_expand(parser, action.help).replace("%(default)s", str(action.default))),
        ]
    return lines


def manpage(command: str) -> str:
    """The man page of ``command`` in roff (man macros)."""
    section, build = _parsers()[command]
    parser = build()
    usage = " ".join(parser.format_usage().removeprefix("usage: ").split())
    lines = [
        f'.TH "{command.upper()}" "{section}" "" "fleetbus {fleetbus_version()}" "fleetbus"',
        ".SH NAME",
        f"{_roff(command)} \\- {_roff(_first_sentence(parser.description or ''))}",
        ".SH SYNOPSIS",
        _roff(usage),
        ".SH DESCRIPTION",
        _roff(" ".join((parser.description or "").split())),
        ".SH OPTIONS",
        *_option_block(parser),
    ]
    subs = list(_subcommands(parser))
    if subs:
        lines.append(".SH COMMANDS")
        for name, text, sub in subs:
            lines += [".SS", f"\\fB{_roff(command)} {_roff(name)}\\fR"]
            description = sub.description or text
            if description:
                lines.append(_roff(" ".join(description.split())))
            block = _option_block(sub)
            if block:
                lines += [".PP", *block]
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBFLEET_SERVER\\fR",
        "NATS server URL(s) when no flag or configuration names one.",
        ".TP",
        "\\fBFLEET_NKEY\\fR",
        "The nkey seed file to sign and connect with.",
        ".TP",
        "\\fBFLEET_USER\\fR",
        "The principal name when the key file records none.",
        ".SH SEE ALSO",
        ", ".join(f"\\fB{_roff(c)}\\fR({_parsers()[c][0]})" for c in COMMANDS if c != command),
        "",
    ]
    return "\n".join(lines)


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    head = text.split(". ")[0].rstrip(".")
    if head.startswith("``"):  # "``prog``: what it does"
        return head.split(": ", 1)[-1]
    return head.split(": ", 1)[0]  # "The fleetbus agent: runs ..." names it before the colon


def man_file(command: str) -> str:
    return f"{command}.{_parsers()[command][0]}"


def write_man(directory: Path) -> list[Path]:
    """Render every command's man page into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for command in COMMANDS:
        path = directory / man_file(command)
        path.write_text(manpage(command), encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fleet.shell --write-man DIR``: regenerate the shipped man pages."""
    parser = argparse.ArgumentParser(prog="python -m fleet.shell", description=main.__doc__)
    parser.add_argument("--write-man", type=Path, metavar="DIR", required=True)
    args = parser.parse_args(argv)
    for path in write_man(args.write_man):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
