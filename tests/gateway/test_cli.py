"""`ember keys` against a running server."""

from __future__ import annotations

import json

import httpx
from typer.testing import CliRunner

from ember.cli import app
from ember.config import ServerConfig
from tests.gateway.test_gateway import ADMIN, MODEL, make_app
from tests.server.fakes import serving


def test_keys_create_list_update_revoke(tmp_path):
    runner = CliRunner()
    with serving(make_app(tmp_path, f"sqlite:///{tmp_path}/ember.db"), ServerConfig(port=0)) as (host, port):
        url = f"http://{host}:{port}"
        base = ["keys", "create", "--url", url, "--admin-key", ADMIN]
        made = runner.invoke(app, [*base, "--team", "ml", "--rpm", "5", "--models", f"{MODEL},other"])
        assert made.exit_code == 0, made.output
        secret = made.stderr.split("key (shown once): ")[1].strip()
        card = json.loads(made.stdout)
        assert card["models"] == [MODEL, "other"] and card["rpm"] == 5 and secret not in made.stdout
        auth = {"Authorization": f"Bearer {secret}"}
        body = {"model": MODEL, "prompt": [1], "max_tokens": 1}
        assert httpx.post(url + "/v1/completions", json=body, headers=auth).status_code == 200
        listed = runner.invoke(app, ["keys", "list", "--url", url, "--admin-key", ADMIN, "--team", "ml"])
        assert card["id"] in listed.stdout and "active" in listed.stdout
        updated = runner.invoke(
            app, ["keys", "update", card["id"], "--url", url, "--admin-key", ADMIN, "--tpm", "99"]
        )
        assert json.loads(updated.stdout)["tpm"] == 99
        revoked = runner.invoke(app, ["keys", "revoke", card["id"], "--url", url, "--admin-key", ADMIN])
        assert json.loads(revoked.stdout)["revoked"] is True
        assert httpx.post(url + "/v1/completions", json=body, headers=auth).status_code == 401
        wrong = runner.invoke(app, ["keys", "list", "--url", url, "--admin-key", "nope"])
        assert wrong.exit_code == 1 and "401" in wrong.stderr
