"""The one exception type that means "the user's input is wrong": the CLI prints it as one line, exit 2;
and what a Ctrl-C says it left."""
import sys


class XpertError(Exception):
    """A problem with the user's input (file, option, spec). The message names the file or field."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C that left something the user must know about; the message says what is kept and how to go on."""


def written() -> list:
    """Outputs this process renamed into place (complete), without importing the writer (torch)."""
    writer = sys.modules.get("xpertctl.io.writer")
    return list(writer.written) if writer is not None else []


def interrupted_message(e: BaseException) -> str:
    """What a Ctrl-C left: the command's own note (Interrupted), the outputs already complete, or nothing."""
    inner = e if isinstance(e, KeyboardInterrupt) else (e.__cause__ or e.__context__)
    if isinstance(inner, Interrupted) and str(inner):
        return f"interrupted; {inner}"
    done = written()
    if done:
        return (f"interrupted after {', '.join(map(str, done))} was completely written; it is kept "
                "(remove it if you do not want it)")
    return "interrupted; no partial output was kept"


def forget_written() -> None:
    """A new command or recipe step starts: earlier outputs are not its own."""
    writer = sys.modules.get("xpertctl.io.writer")
    if writer is not None:
        writer.written.clear()
