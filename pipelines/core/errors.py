"""Errors a user can act on: what went wrong and how to fix it, printed as one line by the CLI."""


class CDLError(Exception):
    """A problem the user can fix. `fix` says how; the CLI prints both without a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})" if self.fix else self.problem


class ConfigError(CDLError):
    """cdl.yaml or a CDL_* variable is invalid."""


class StackError(CDLError):
    """A stack component (Postgres, a service) cannot be started, reached or stopped."""
