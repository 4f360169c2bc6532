"""The one exception type a user is meant to see.

Anything the user can fix (a bad path, a wrong config key, a missing package) is raised as
`CaiError` with one clear sentence; the CLI prints that sentence and exits non-zero without a
traceback. Bugs stay ordinary exceptions so their tracebacks reach us.
"""


class CaiError(Exception):
    """A mistake in the user's input or environment, explained in one sentence."""
