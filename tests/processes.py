"""Helpers for tests that drive the real commands in child processes."""
import signal


def default_sigint():
    """Popen(preexec_fn=...): the child gets Ctrl-C as a terminal delivers it. A shell starts
    background jobs with SIGINT ignored, and that disposition is inherited, so a test suite run
    with `&` would otherwise test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
