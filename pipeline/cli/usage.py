"""Usage errors in one line, and parameters that read the usual way in help.

Why: click prints a usage error as four lines (usage, "Try ... for help", a blank line, the error),
and typer's own help labels a plain flag ``--overwrite <bool>`` (so ``--overwrite true`` looks right,
and is refused) and a required argument ``{pages}``. Here a usage error is one line, the error and
what to do, and the help shows flags alone and arguments as ``PAGES`` and ``[PAGE_ID]``; both for
every command, whatever typer version lays the help out.
"""
from __future__ import annotations

import re

#: Words that read as a value given to a flag: ``--overwrite true``.
FLAG_VALUES = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def plain_labels(command) -> None:
    """Flags without a type label; arguments named in capitals, ``[X]`` when optional (in place, on
    ``command`` and every subcommand of it)."""
    for param in getattr(command, "params", ()):
        if getattr(param, "param_type_name", "") == "argument":
            _capital_argument(param)
        else:
            _flag_alone(param)
    if hasattr(command, "get_help_option"):  # -h/--help is made on demand, apart from the params
        made = command.get_help_option
        command.get_help_option = lambda ctx: _flag_alone(made(ctx))
    for sub in (getattr(command, "commands", None) or {}).values():
        plain_labels(sub)


def _flag_alone(param):
    if param is not None and getattr(param, "is_flag", False):
        param.display_type_rich = _no_type  # typer's rich help asks this for the type column
    return param


def _no_type(ctx=None):
    return None


def _capital_argument(param) -> None:
    if param.metavar is None:
        param.metavar = (param.name or "").upper()
    label = param.metavar + ("..." if param.nargs != 1 else "")
    piece = label if param.required else f"[{label}]"
    param.get_usage_pieces = lambda ctx=None: [piece]


def one_line(exc, argv: list[str] | None = None, root=None) -> str:
    """A click usage error as one line: what is wrong, and what to do about it. ``root``: the
    application's click group, which names the command of an error that came without one."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "pagecube"
    if (ctx is None or ctx.parent is None) and argv and argv[0] in (getattr(root, "commands", None) or {}):
        command = f"pagecube {argv[0]}"
    name = type(exc).__name__
    possibilities = sorted(getattr(exc, "possibilities", None) or ())
    if name == "NoSuchOption":
        if possibilities:
            return f"no such option {exc.option_name} for {command}; did you mean {' or '.join(possibilities)}?"
        return f"no such option {exc.option_name} for {command}; see {command} -h"
    message = _sentence(exc.format_message())
    extra = re.fullmatch(r"got unexpected extra arguments?(?:\(s\))? \((.*)\)", message, re.S | re.I)
    if extra is not None:
        return _extra_arguments(extra.group(1).split(), command, argv or [], ctx)
    if name == "MissingParameter" and ctx is not None:
        return f"{message}; {_usage(ctx)}"
    if message.endswith("?"):  # it suggests already ("Did you mean 'build'?")
        return message
    return f"{message}; see {command} -h"


def _sentence(text: str) -> str:
    """Click's message as the middle of a pagecube line: lower-case start, no final full stop."""
    text = " ".join(text.split()).rstrip(".")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _usage(ctx) -> str:
    return f"usage: {ctx.command_path} {' '.join(ctx.command.collect_usage_pieces(ctx))}"


def _extra_arguments(extra: list[str], command: str, argv: list[str], ctx) -> str:
    if len(extra) == 1 and extra[0].lower() in FLAG_VALUES:
        at = argv.index(extra[0]) if extra[0] in argv else -1
        flag = argv[at - 1] if at > 0 and argv[at - 1].startswith("-") else "a flag"
        return (f"{flag} takes no value (got {extra[0]!r}): give {flag} alone to turn it on, "
                "leave it out to keep it off")
    if len(extra) >= 2:
        return (f"{command} got {len(extra) + 1} paths where it takes one: the shell expanded a glob; quote it so "
                "that pagecube expands it, e.g. 'manifests/*.json'")
    return f"unexpected extra argument {extra[0]!r}; " + (_usage(ctx) if ctx is not None else f"see {command} -h")
