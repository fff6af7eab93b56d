"""`ember keys create|list|update|revoke`: a server's virtual keys through its admin API (/v1/keys).

The admin key comes from --admin-key or $EMBER_ADMIN_KEY; `create` prints the new key once, as the
server answers it only once. Import-light: httpx only.
"""

from __future__ import annotations

import json
import os

import typer

keys_app = typer.Typer(help="Virtual keys of a server: create, list, update, revoke.", no_args_is_help=True)

URL = typer.Option("http://127.0.0.1:8000", "--url", help="the ember server")
ADMIN = typer.Option(None, "--admin-key", help="the server's admin key (default: $EMBER_ADMIN_KEY)")


def _call(url: str, admin_key: str | None, method: str, path: str, body: dict | None = None) -> dict:
    import httpx

    admin_key = admin_key or os.environ.get("EMBER_ADMIN_KEY")
    if not admin_key:
        typer.secho("error: give --admin-key or set $EMBER_ADMIN_KEY", fg="red", err=True)
        raise typer.Exit(2)
    try:
        r = httpx.request(
            method,
            url.rstrip("/") + path,
            json=body,
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        typer.secho(f"error: cannot reach {url}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        typer.secho(f"error: {r.status_code}: {message}", fg="red", err=True)
        raise typer.Exit(1)
    return r.json()


def _settings(**values) -> dict:
    out = {k: v for k, v in values.items() if v is not None}
    if "models" in out:
        out["models"] = [m.strip() for m in out["models"].split(",") if m.strip()]
    return out


def _show(card: dict) -> None:
    typer.echo(json.dumps(card, indent=2))


NAME = typer.Option(None, help="a name for the key")
OWNER = typer.Option(None, help="who holds it")
TEAM = typer.Option(None, help="its team (usage is summed per team too)")
MODELS = typer.Option(None, help="comma-separated models it may call (default: every one)")
RPM = typer.Option(None, min=1, help="requests per minute at most")
TPM = typer.Option(None, min=1, help="tokens per minute at most")
BUDGET = typer.Option(None, min=0, help="spend at most this per period")
UNIT = typer.Option(None, help="the budget's unit: tokens (default) or usd")
PERIOD = typer.Option(None, help="the budget's period: day, month or total (default), UTC")


@keys_app.command("create")
def create(
    url: str = URL,
    admin_key: str | None = ADMIN,
    name: str | None = NAME,
    owner: str | None = OWNER,
    team: str | None = TEAM,
    models: str | None = MODELS,
    rpm: int | None = RPM,
    tpm: int | None = TPM,
    budget: float | None = BUDGET,
    budget_unit: str | None = UNIT,
    budget_period: str | None = PERIOD,
) -> None:
    """Create a virtual key; the key is printed once (on stderr), its settings as JSON."""
    settings = _settings(
        name=name,
        owner=owner,
        team=team,
        models=models,
        rpm=rpm,
        tpm=tpm,
        budget=budget,
        budget_unit=budget_unit,
        budget_period=budget_period,
    )
    made = _call(url, admin_key, "POST", "/v1/keys", settings)
    typer.secho(f"key (shown once): {made.pop('key')}", fg="green", err=True)
    _show(made)


@keys_app.command("update")
def update(
    key_id: str = typer.Argument(..., help="the key's id (vk-...)"),
    url: str = URL,
    admin_key: str | None = ADMIN,
    name: str | None = NAME,
    owner: str | None = OWNER,
    team: str | None = TEAM,
    models: str | None = MODELS,
    rpm: int | None = RPM,
    tpm: int | None = TPM,
    budget: float | None = BUDGET,
    budget_unit: str | None = UNIT,
    budget_period: str | None = PERIOD,
) -> None:
    """Change the settings given; the others stay as they are."""
    settings = _settings(
        name=name,
        owner=owner,
        team=team,
        models=models,
        rpm=rpm,
        tpm=tpm,
        budget=budget,
        budget_unit=budget_unit,
        budget_period=budget_period,
    )
    _show(_call(url, admin_key, "POST", f"/v1/keys/{key_id}", settings))


@keys_app.command("list")
def list_keys(
    url: str = URL,
    admin_key: str | None = ADMIN,
    team: str | None = typer.Option(None, help="only this team's keys"),
) -> None:
    """List the keys (never the keys themselves: their ids and settings)."""
    path = "/v1/keys" + (f"?team={team}" if team else "")
    for card in _call(url, admin_key, "GET", path)["data"]:
        state = "revoked" if card["revoked"] else "active"
        limits = f"rpm={card['rpm']} tpm={card['tpm']} budget={card['budget']} {card['budget_unit']}/{card['budget_period']}"
        typer.echo(f"{card['id']}  {card['prefix']}...  {state}  team={card['team']}  {limits}")


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="the key's id (vk-...)"),
    url: str = URL,
    admin_key: str | None = ADMIN,
) -> None:
    """Revoke a key: it stops on every replica of the server's database within a second."""
    _show(_call(url, admin_key, "POST", f"/v1/keys/{key_id}/revoke"))
