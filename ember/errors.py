"""Errors a caller can act on. The server maps InvalidRequest to a 400 naming `param`."""

from __future__ import annotations


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code
