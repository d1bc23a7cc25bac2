"""`python -m xpertctl ...` is the `xpertctl` command."""
import sys

from .cli import main

sys.argv[0] = "xpertctl"  # what provenance records as the command's name
main()
