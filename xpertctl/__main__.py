"""`python -m xpertctl ...` is the `xpertctl` command (the recipe runner starts --jobs steps this way)."""
import signal
import sys

from .cli import main

sys.argv[0] = "xpertctl"  # what provenance records as the command's name
# Ctrl-C (or the runner passing one on) must clean up even when started with SIGINT ignored (a shell's
# background job), as the runner's steps are
signal.signal(signal.SIGINT, signal.default_int_handler)
main()
