"""`python -m xpertctl ...` is the `xpertctl` command."""
import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process imports this module as its __mp_main__
    sys.argv[0] = "xpertctl"  # what provenance records as the command's name
    main()
