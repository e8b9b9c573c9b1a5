"""What every command needs: the settings (loaded once, lazily) and the stack built on them."""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console

from pipelines.core.config import Settings, load_settings
from pipelines.core.stack import Stack

# Piped output (grep, CI logs) gets wide lines instead of rich's default 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


@dataclass
class CLIContext:
    config_path: Path | None = None
    stack_name: str | None = None
    _settings: Settings | None = field(default=None, repr=False)
    _stack: Stack | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path, self.stack_name)
        return self._settings

    @property
    def stack(self) -> Stack:
        if self._stack is None:
            self._stack = Stack(self.settings)
        return self._stack


def cli_context(ctx: typer.Context) -> CLIContext:
    return ctx.find_root().obj


def stop_on_signal() -> threading.Event:
    """An event set by SIGTERM (the supervisor stopping a service) or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def say(line: str) -> None:
    """A timestamped line for a long-running command's log (one line, however long)."""
    console.print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", highlight=False, soft_wrap=True)
