"""`python -m xpertctl.step_worker`: one worker of `xpertctl run --jobs N` (see recipe.serve).

Workers live for the whole run, so each step pays no interpreter and torch start-up (~3-6 s here)."""
import signal

from .ops_table import BY_NAME
from .recipe import serve

if __name__ == "__main__":
    # Ctrl-C passed on by the runner must clean up even when it was started with SIGINT ignored
    # (a shell's background job), as the steps of one-at-a-time runs do
    signal.signal(signal.SIGINT, signal.default_int_handler)
    serve(BY_NAME)
