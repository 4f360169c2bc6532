"""The one exception type a user is meant to see.

Anything the user can fix (a bad path, a wrong config key, a missing package) is raised as
`CaiError` with one clear sentence; the CLI prints that sentence and exits non-zero without a
traceback. Bugs stay ordinary exceptions so their tracebacks reach us.
"""


class CaiError(Exception):
    """A mistake in the user's input or environment, explained in one sentence."""


class LogprobsUnavailable(CaiError):
    """A backend (a server) that cannot return the log-probabilities a judging method reads.

    The judging methods that read log-probs (``mc``, ``mc-cot``) are then unsupported on it;
    ``auto`` records the reason and measures the others (``votes``)."""


class NoChoiceInTopLogprobs(CaiError):
    """For some prompts no answer option was among the top next tokens a server listed: abstentions.

    Raised once every prompt of the call was scored, so nothing is lost: ``scores`` is the whole
    result, as ``choice_logprobs`` would have returned it, with ``-inf`` for every option of an
    abstained prompt, and ``rows`` lists those prompts' indices.
    """

    def __init__(self, message: str, scores: list[list[float]], rows: list[int]) -> None:
        super().__init__(message)
        self.scores = scores
        self.rows = rows
