"""The xpertctl command line: Typer commands built from the table of operations (ops_table); each
parses, calls its adapter and prints what it returns (the output path) on stdout. No logic here."""
from __future__ import annotations

import inspect
import os
import signal
import sys
import threading
from typing import Annotated, List, Literal, Optional

import typer
from typer.core import TyperOption

from .errors import XpertError, forget_written, interrupted_message, written
from .ops_table import COMMANDS, REQUIRED, Command, Param

HELP = "XPERT model surgery: find cross-domain experts in an MoE LLM and graft them into a dense LM."


def _version(value: bool) -> None:
    if value:
        from . import __version__
        print(__version__)
        raise typer.Exit()


def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")] = None) -> None:
    pass


def _annotation(p: Param):
    base = Literal[p.choices] if p.choices else p.type
    ann = List[base] if p.multiple else base
    if p.default is None:
        ann = Optional[ann]
    info = typer.Option(*p.flags, help=p.help) if p.flags else typer.Argument(help=p.help, metavar=p.metavar)
    return Annotated[ann, info]


def _emit(result) -> None:
    """stdout carries only what the command returns: its output path (or, for --json, the document)."""
    for item in result if isinstance(result, list) else [result]:
        if item is not None:
            print(item)


def _finished() -> None:
    """The command's work is done: a Ctrl-C (or SIGTERM) from here on (printing, interpreter shutdown) stops
    nothing, so it ends with a line saying the output is complete instead of a silent exit 130 (143)."""
    def late(signum, frame):
        done = ", ".join(map(str, written())) or "its output"
        what = "terminated" if signum == signal.SIGTERM else "interrupted"
        os.write(2, f"xpertctl: {what} after the command finished; {done} is complete and kept\n".encode())
        os._exit(143 if signum == signal.SIGTERM else 130)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, late)
        if signal.getsignal(signal.SIGTERM) is _terminate:
            signal.signal(signal.SIGTERM, late)


def _pipe_closed() -> None:
    """stdout's reader is gone (`xpertctl ... | head -c 10`): the work is done and its outputs are in place;
    end as git (write_or_die.c) and coreutils do, without a word and killed by SIGPIPE, which a shell reports
    as 141 (and `set -o pipefail` as a failure of the pipeline's writer, as for `cat`)."""
    try:  # Python's last flush of stdout at exit finds somewhere to go
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    sys.exit(128 + signal.SIGPIPE)  # a platform where SIGPIPE did not end the process


_terminated = False  # SIGTERM arrived: said as "terminated", exit 143


def _terminate(signum, frame):
    """SIGTERM (kill, a scheduler, a container stop) stops a command as Ctrl-C does: the KeyboardInterrupt
    unwinds through the atomic writes, which remove their temp output."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _stopped(e: BaseException) -> int:
    """Say what a Ctrl-C or SIGTERM left (one line); the exit code."""
    msg = interrupted_message(e)
    if _terminated:
        msg = "terminated" + msg.removeprefix("interrupted")
    print(f"xpertctl: {msg}", file=sys.stderr)
    return 143 if _terminated else 130


def _callback(cmd: Command):
    def callback(**values):
        try:
            result = cmd.invoke(values)
        except KeyboardInterrupt as e:  # said here: typer turns it into a bare exit code 130
            sys.exit(_stopped(e))
        except BrokenPipeError:  # a summary printed to a reader that went away (click would exit 1 silently)
            _pipe_closed()
        _finished()
        try:
            _emit(result)
            sys.stdout.flush()
        except BrokenPipeError:
            _pipe_closed()
    params = [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, annotation=_annotation(p),
                                default=inspect.Parameter.empty if p.default is REQUIRED else p.default)
              for p in cmd.params]
    callback.__signature__ = inspect.Signature(params)
    callback.__annotations__ = {p.name: q.annotation for p, q in zip(cmd.params, params)}
    callback.__name__ = cmd.name.replace(" ", "_")
    return callback


def build_app(commands: tuple[Command, ...] = COMMANDS) -> typer.Typer:
    app = typer.Typer(add_completion=True, pretty_exceptions_enable=False, no_args_is_help=True, help=HELP)
    app.callback()(_root)
    groups: dict[str, typer.Typer] = {}
    for cmd in commands:
        *group, name = cmd.name.split()
        parent = app
        if group:
            if group[0] not in groups:
                groups[group[0]] = typer.Typer(no_args_is_help=True, help=GROUP_HELP.get(group[0], ""))
                app.add_typer(groups[group[0]], name=group[0])
            parent = groups[group[0]]
        example = "\n\n".join(f"  {line}" for line in cmd.example.splitlines())
        files = "".join(f"{line}\n\n" for line in cmd.formats.splitlines())
        shown = "".join(f"{line}\n\n" for line in cmd.output.splitlines())
        epilog = (f"Files it reads:\n\n{files}" if files else "") + (f"What it prints:\n\n{shown}" if shown else "") \
            + f"Example:\n\n{example}"
        parent.command(name, help=cmd.help, epilog=epilog)(_callback(cmd))
    return app


GROUP_HELP = {"corpus": "Build the multi-domain demo corpus, its tokenizer, and its tasks (cloze, word order, SFT)."}


class _Flag(TyperOption):
    def display_type_rich(self, ctx):  # a flag takes no value: show no "<bool>" type column
        return None


def click_command(app: typer.Typer):
    """The click command tree of `app`, its on/off flags shown without a value type."""
    root = typer.main.get_command(app)
    todo = [root]
    while todo:
        cmd = todo.pop()
        todo += list(getattr(cmd, "commands", {}).values())
        help_opt = cmd.get_help_option(cmd.context_class(cmd))  # created once and cached by the command
        for p in [*cmd.params, help_opt]:
            if isinstance(p, TyperOption) and p.is_bool_flag:
                p.__class__ = _Flag
    return root


app = build_app()


def main() -> None:
    """Entry point: every user error becomes one line on stderr and exit code 2, never a traceback."""
    # typer may vendor click: take its exception classes from what it exports
    mro = {c.__name__: c for c in typer.BadParameter.__mro__}
    usage_error, click_exception = mro["UsageError"], mro["ClickException"]
    forget_written()  # a new command in this process (tests)
    global _terminated
    _terminated = False
    on_term = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        on_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        _main(usage_error, click_exception)
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def _main(usage_error, click_exception) -> None:
    try:
        rv = click_command(app).main(prog_name="xpertctl", standalone_mode=False)
    except XpertError as e:
        print(f"xpertctl: error: {e}", file=sys.stderr)
        sys.exit(2)
    except usage_error as e:
        if not e.format_message():  # bare `xpertctl`: help was printed
            sys.exit(0)
        hint = f" (see 'xpertctl {e.ctx.info_name} --help')" if e.ctx and e.ctx.parent else " (see 'xpertctl --help')"
        print(f"xpertctl: error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click_exception as e:
        print(f"xpertctl: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt) as e:
        sys.exit(_stopped(e))
    if rv == 130:  # Ctrl-C inside a command (typer reports it as this exit code)
        sys.exit(_stopped(KeyboardInterrupt()))
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
