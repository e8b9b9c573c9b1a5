"""The Label Studio server of a stack.

The server runs from its own venv (`.cdl/venvs/label-studio`, made by `make setup`) as the
supervised service 'label-studio', with its database in the stack's Postgres. Its admin user and
API token are generated on the first start, without prompts, and kept in `<home>/secrets`
(outside git). Start it with `cdl stack up --with label-studio`.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipelines.core.errors import AlreadyExists, StackError, Unavailable
from pipelines.core.postgres import free_port, port_is_free
from pipelines.core.services import ServiceSpec
from pipelines.core.stack import Stack
from pipelines.data.labeling.client import LabelStudioClient

SERVICE = "label-studio"
ADMIN_EMAIL = "admin@cdl.local"


def _secret(path: Path, make) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


class LabelStudioServer:
    def __init__(self, stack: Stack):
        self.stack = stack
        home = stack.settings.home
        self.data_dir = home / "label-studio"
        self.state_file = self.data_dir / "cdl-state.json"
        self.token_file = home / "secrets" / "label-studio-token"
        self.password_file = home / "secrets" / "label-studio-password"
        self.executable = stack.settings.venvs / "label-studio" / "bin" / "label-studio"

    @property
    def token(self) -> str:
        return _secret(self.token_file, lambda: secrets.token_hex(20))  # 40 hex: a legacy token

    @property
    def port(self) -> int:
        """Chosen at the first start and kept while it stays free."""
        try:
            port = json.loads(self.state_file.read_text())["port"]
        except (OSError, ValueError, KeyError):
            port = None
        if port is None or (not self.running() and not port_is_free(port)):
            port = free_port()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps({"port": port}))
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self.stack.supervisor.status(SERVICE).healthy

    def spec(self) -> ServiceSpec:
        if not self.executable.exists():
            raise StackError(
                f"Label Studio is not installed at {self.executable}", "run 'make setup'"
            )
        db = urlsplit(self.stack.dsn(self.stack.settings.stack.postgres.databases.label_studio))
        port = self.port
        password = _secret(self.password_file, lambda: secrets.token_urlsafe(18))
        env = {
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "DJANGO_DB": "default",
            "POSTGRE_NAME": unquote(db.path.lstrip("/")),
            "POSTGRE_USER": unquote(db.username or ""),
            "POSTGRE_PASSWORD": unquote(db.password or ""),
            "POSTGRE_HOST": db.hostname or "127.0.0.1",
            "POSTGRE_PORT": str(db.port or 5432),
            # Webhooks go to the stack's own receiver on 127.0.0.1.
            "SSRF_PROTECTION_ENABLED": "false",
            # Closed and quiet: nobody signs up without an invite link, and no error reports go
            # to Label Studio's Sentry (its default DSNs, backend and frontend, are on).
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            # The admin user, made on the first start. In the environment, not the command line:
            # other users see a command line, and a password starting with '-' breaks its parsing.
            "LABEL_STUDIO_USERNAME": ADMIN_EMAIL,
            "LABEL_STUDIO_PASSWORD": password,
            "LABEL_STUDIO_USER_TOKEN": self.token,
        }
        argv = [
            str(self.executable),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(self.data_dir),
            "--enable-legacy-api-token",
        ]
        return ServiceSpec(
            name=SERVICE,
            argv=argv,
            env=env,
            cwd=self.data_dir,
            health_url=f"http://127.0.0.1:{port}/health",
            address=f"http://127.0.0.1:{port}",
            start_timeout_s=240,
        )

    def add_user(self, email: str) -> str:
        """A labeler's account in the admin's organization, with a generated password, which is
        returned (sign-up is closed: this is how people join)."""
        client = self.client()
        if email.lower() in {e.lower() for e in client.user_emails().values()}:
            raise AlreadyExists(f"Label Studio already has a user {email}", "pick another email")
        client.create_user(email)
        password = secrets.token_urlsafe(12)
        # Label Studio's own command sets it; the password goes in on stdin, not the command line.
        done = subprocess.run(
            [
                str(self.executable),
                "reset_password",
                "--username",
                email,
                "--data-dir",
                str(self.data_dir),
            ],
            input=password + "\n",
            env={**os.environ, **self.spec().env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if "Password successfully changed" not in done.stdout:
            output = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise Unavailable(
                f"Label Studio could not set the password of {email}: {' | '.join(output)}",
                "check .cdl/logs/label-studio.log, then run 'cdl label users add' again",
            )
        return password

    def client(self) -> LabelStudioClient:
        if not self.running():
            raise StackError(
                "Label Studio is not running", "run 'cdl stack up --with label-studio'"
            )
        return LabelStudioClient(self.url, self.token)
