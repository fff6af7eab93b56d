"""/v1/files: upload (multipart, streamed to disk under --max-upload-bytes), list, retrieve, content,
delete, in OpenAI's shapes. A file belongs to the key that uploaded it (ServerState.tenant): to every
other key it does not exist (404). Files are stored as bytes and parsed only as data, by the jobs that
use them.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import Query, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from ember.errors import InvalidRequest
from ember.store import db
from ember.store.db import Store
from ember.store.files import FileStore, FileTooLarge

PURPOSES = ("fine-tune", "batch", "evals", "user_data", "assistants", "vision")
MAX_FILENAME = 255


class Refusal(Exception):
    """A 4xx in OpenAI's error shape (the app's handler answers it)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def file_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
    }


def owned_file(store: Store, file_id: str, tenant: str | None, param: str = "file_id") -> dict:
    """The row of `file_id` if `tenant` owns it; a 404 otherwise (another key's file too)."""
    row = store.get(db.files, file_id)
    if row is None or row["tenant"] != tenant:
        raise Refusal(404, f"no file with id '{file_id}'", param=param, code="file_not_found")
    return row


def listing(rows: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": rows,
        "first_id": rows[0]["id"] if rows else None,
        "last_id": rows[-1]["id"] if rows else None,
        "has_more": has_more,
    }


def install_files(router, store: Store, blobs: FileStore, max_upload_bytes: int, tenant_of) -> None:
    """The routes on `router` (the app itself: the gate decides access by the routes it lists)."""

    @router.post("/v1/files")
    async def upload(request: Request) -> dict:
        tenant = tenant_of(request)
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:  # python-multipart's refusals of a malformed body
            if type(exc).__name__ in ("BodyTooLarge", "BodyTimeout"):
                raise
            raise InvalidRequest(
                f"the body is not a valid multipart form: {exc}", code="invalid_form"
            ) from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("'file' is required: the file's bytes as a multipart part", param="file")
            if purpose not in PURPOSES:
                raise InvalidRequest(
                    f"purpose must be one of: {', '.join(PURPOSES)} (got {purpose!r})", param="purpose"
                )
            name = (upload.filename or "upload").replace("/", "_").replace("\\", "_")[:MAX_FILENAME]
            file_id = db.new_id("file")
            try:
                size, digest = await asyncio.to_thread(blobs.write, file_id, upload.file, max_upload_bytes)
            except FileTooLarge:
                raise Refusal(
                    413,
                    f"the file is more than {max_upload_bytes} bytes, the most this server accepts "
                    "(the operator sets --max-upload-bytes)",
                    param="file",
                    code="file_too_large",
                ) from None
        finally:
            await form.close()
        row = {
            "id": file_id,
            "tenant": tenant,
            "filename": name,
            "purpose": purpose,
            "bytes": size,
            "sha256": digest,
            "created_at": db.now(),
            "expires_at": None,
        }
        return file_object(await asyncio.to_thread(store.insert, db.files, row))

    @router.get("/v1/files")
    async def list_files(
        request: Request,
        purpose: str | None = None,
        limit: int = Query(10000, ge=1, le=10000),
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
    ) -> dict:
        where = [db.files.c.tenant.is_(None) if (t := tenant_of(request)) is None else db.files.c.tenant == t]
        if purpose is not None:
            where.append(db.files.c.purpose == purpose)
        rows, more = await asyncio.to_thread(store.page, db.files, where, after, limit, order == "desc")
        return listing([file_object(r) for r in rows], more)

    @router.get("/v1/files/{file_id}")
    async def retrieve(file_id: str, request: Request) -> dict:
        return file_object(owned_file(store, file_id, tenant_of(request)))

    @router.get("/v1/files/{file_id}/content")
    async def content(file_id: str, request: Request) -> FileResponse:
        row = owned_file(store, file_id, tenant_of(request))
        return FileResponse(blobs.path(row["id"]), media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete(file_id: str, request: Request) -> dict:
        row = owned_file(store, file_id, tenant_of(request))
        await asyncio.to_thread(store.delete, db.files, row["id"])
        await asyncio.to_thread(blobs.remove, row["id"])
        return {"id": row["id"], "object": "file", "deleted": True}
