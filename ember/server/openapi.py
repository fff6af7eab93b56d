"""The OpenAPI document (`/openapi.json`) as the server answers: every error in OpenAI's shape with the
statuses each route can give, 400 for a bad body (never FastAPI's 422, which this server does not send),
the bearer key, and the event stream that chat and completions send when asked to.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
_WHY = {
    400: "a field is missing, of the wrong type, out of range, unknown or not served; a path with control "
    "characters",
    401: "a missing or wrong API key",
    403: "this key may not do this",
    404: "no such model",
    408: "the body did not arrive within --body-timeout",
    409: "an adapter of that name exists, or the adapter is in use",
    413: "the body is larger than --max-request-bytes",
    429: "the queue is full (Retry-After)",
    503: "loading, draining or the engine stopped (Retry-After)",
}
# Beyond 400 (a route with a body) and 401 (a route behind the key): what each route may answer.
_STATUSES = {
    ("post", "/v1/chat/completions"): {404, 429, 503},
    ("post", "/v1/completions"): {404, 429, 503},
    ("post", "/v1/embeddings"): {404, 503},
    ("get", "/v1/models/{model_id}"): {404},
    ("get", "/v1/adapters"): {403},
    ("post", "/v1/adapters"): {403, 404, 409, 503},
    ("delete", "/v1/adapters/{name}"): {403, 404, 409, 503},
    ("get", "/metrics"): {403},
    ("get", "/health"): {503},
    ("get", "/ready"): {503},
}
_STREAMED = {"/v1/chat/completions", "/v1/completions"}


def install_openapi(app: FastAPI, public: tuple[str, ...]) -> None:
    """Serve the rewritten document; `public`: the paths reachable without a key."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            rewrite(doc, public)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def rewrite(doc: dict, public: tuple[str, ...]) -> None:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            statuses = set(_STATUSES.get((method, path), ()))
            if "requestBody" in op or "{" in path:  # a bad body, or a path parameter with control characters
                statuses.add(400)
            if "requestBody" in op:  # refused before it is read: too large, or too slow to arrive
                statuses.update((408, 413))
            if path not in public:
                statuses.add(401)
                op["security"] = [{"bearer": []}, {}]  # {}: a server started without keys is open
            for status in sorted(statuses):
                responses[str(status)] = {"description": _WHY[status], "content": error}
            if path in _STREAMED and "200" in responses:
                responses["200"].setdefault("content", {})["text/event-stream"] = {
                    "schema": {"type": "string", "description": "server-sent events when stream is true"}
                }
            if path == "/metrics" and "200" in responses:
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
