"""Errors a user can act on: what went wrong and how to fix it, printed as one line by the CLI.

Raise the kind that says what went wrong, so that callers catch what they mean (a missing repo,
not every problem): `NotFound`, `AlreadyExists`, `Invalid`, `Unavailable`, `Unsupported`.
Adapters of outside libraries (Label Studio, pachd, MLflow) translate their library's errors
into these kinds at their boundary; nothing above them sees a library exception.
"""


class CDLError(Exception):
    """A problem the user can fix. `fix` says how; the CLI prints both without a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})" if self.fix else self.problem


class NotFound(CDLError):
    """What was asked for does not exist: a repo, branch, commit, file, snapshot, model."""


class AlreadyExists(CDLError):
    """A name that must be new is taken."""


class Invalid(CDLError):
    """Input that cannot be used: a bad name, field, spec, file or combination of options."""


class Unavailable(CDLError):
    """A component does not answer or refuses to work right now: the database, a server, a
    service; trying again later, or starting it, may help."""


class Unsupported(CDLError):
    """The selected backend cannot do this operation (e.g. `diff` on Pachyderm)."""


class ConfigError(Invalid):
    """cdl.yaml or a CDL_* variable is invalid."""


class StackError(Unavailable):
    """A stack component (Postgres, a service) cannot be started, reached or stopped."""
