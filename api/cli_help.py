"""What makes the command line readable and quick: help without type tags, errors on one line each.

Nothing here imports torch, JAX or FAISS: `influence --help`, `influence COMMAND --help` and argument errors are
answered before any of them loads. Errors of the library (`ValueError`, `KeyError`, `FileNotFoundError`, the
store's and the indexer's errors) end a command with one line on stderr and exit status 2; the detail of the
library beneath them (SQL, C++ signatures, URLs) is printed only under the global ``--verbose``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from typer.core import TyperArgument, TyperGroup

_click = typer.core._click

#: set by the global --verbose option
VERBOSE = {"on": False}
#: the metavar shown for a value of each Python type (typer's own shows "<int>", "<list[int]>")
_METAVARS = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "path": "PATH", "bool": ""}
#: (module, class) of the library's errors a command reports on one line, checked only once the module is loaded
# the last: --ray without the [ray] extra (the message says how to install it)
_LIBRARY_ERRORS = (
    ("store.errors", "StoreError"),
    ("indexer.errors", "IndexerError"),
    ("api.ray_cluster", "RayNotInstalledError"),
)


def _readable(param: Any) -> None:
    """Replaces typer's type tags of one parameter by a plain metavar (flags get none)."""
    if getattr(param, "_readable", False):
        return
    if isinstance(param, TyperArgument):
        name = param.metavar or param.name.upper()
        param.metavar = name
        param.display_type_rich = lambda ctx: None  # the name column already shows RUN, TASK
        usage = name + ("..." if param.nargs != 1 else "")
        param._usage_display_name = lambda: usage if param.required else f"[{usage}]"
    elif getattr(param, "is_flag", False):
        param.metavar = ""
    elif param.metavar is None:
        tag = param.display_type(None).strip("<>")
        tag = tag[5:-1] if tag.startswith("list[") else tag
        param.metavar = _METAVARS.get(tag, tag.upper())
    param._readable = True


def usage_line(err: Any) -> str:
    """One line for a usage error: the message and where the help is."""
    ctx = getattr(err, "ctx", None)
    where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    return f"error: {err.format_message()}{where}"


class Group(TyperGroup):
    """The `influence` group: plain metavars in every help, one-line usage errors, for every subcommand."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for p in params:
            _readable(p)
        return params

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None and not getattr(cmd, "_readable", False):
            _patch_command(cmd)
        return cmd

    def make_context(self, info_name: Any, args: list[str], parent: Any = None, **extra: Any) -> Any:
        return _one_line(lambda: super(Group, self).make_context(info_name, args, parent=parent, **extra))

    def invoke(self, ctx: Any) -> Any:
        return _one_line(lambda: super(Group, self).invoke(ctx))


def _patch_command(cmd: Any) -> None:
    original = cmd.get_params

    def get_params(ctx: Any) -> list[Any]:
        params = original(ctx)
        for p in params:
            _readable(p)
        return params

    cmd.get_params = get_params
    cmd._readable = True


def _one_line(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except _click.exceptions.NoArgsIsHelpError:
        raise
    except _click.exceptions.UsageError as err:
        typer.echo(usage_line(err), err=True)
        raise typer.Exit(2) from None


def _short_detail(text: str) -> str:
    """The gist of a library's message: its first line, without a C++ signature, SQL or URLs, at most 100 chars."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    cpp = re.search(r"Error in .*? at \S+:\d+: (?:Error: '.*?' failed: )?(.*)", first)
    if cpp:
        first = cpp.group(1)
    first = re.sub(r"\s*\(?Background on this error at: \S+", "", first)
    first = re.sub(r"https?://\S+", "", first).strip()
    return first if len(first) <= 100 else first[:97] + "..."


def short_message(err: BaseException) -> str:
    """The error's message on one line, without the detail of the library beneath it (the text of its cause,
    which our messages quote), with a pointer to --verbose when something was left out."""
    full = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    msg = full
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip() and str(cause) in msg:
        msg = msg.replace(str(cause), _short_detail(str(cause)))
    lines = [line for line in msg.splitlines() if line.strip()]
    one = lines[0] if lines else type(err).__name__
    if len(lines) > 1 and one.count("(") > one.count(")"):
        one += " ...)"
    return one + (" (--verbose for details)" if one != full else "")


def full_message(err: BaseException) -> str:
    """The error with every cause beneath it (the --verbose form)."""
    parts, seen = [], set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__module__}.{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "error: " + "\ncaused by ".join(parts)


def is_user_error(err: BaseException) -> bool:
    """Whether the error is one a command reports on one line (bad input, a missing or corrupt run)."""
    if isinstance(err, ValueError | KeyError | FileNotFoundError):
        return True
    for module, name in _LIBRARY_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(err, getattr(loaded, name)):
            return True
    return False


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with one readable line on stderr and exit status 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not is_user_error(err):
                raise
            typer.echo(full_message(err) if VERBOSE["on"] else f"error: {short_message(err)}", err=True)
            raise typer.Exit(2) from None

    return wrapper
