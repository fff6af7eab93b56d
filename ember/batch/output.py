"""A batch's output and error files, assembled from its rows (never from memory), in OpenAI's line format:

    {"id": "batch_req-...", "custom_id": "...", "response": {"status_code", "request_id", "body"},
     "error": null}

A line answered 200 goes to the output file; one answered 4xx/5xx goes to the error file with its
response; a line refused at validation, or never run because the batch was cancelled or expired, goes to
the error file with `response: null` and an `error`. Each custom_id is in exactly one line of the two.
The files' ids follow from the batch's, so assembling again after a crash finds what was written.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from collections.abc import Iterator

from ember.server.platform import Platform
from ember.store import batches as rows
from ember.store import db

UNRUN = {
    "cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
    "expired": ("batch_expired", "the batch's 24h completion window ended before this request ran"),
}


def answered(line: dict) -> dict:
    """An output or error-file line for a line that ran."""
    response = {
        "status_code": line["status_code"],
        "request_id": line["request_id"],
        "body": line["response"],
    }
    return {"id": line["id"], "custom_id": line["custom_id"], "response": response, "error": None}


def refused(custom_id: str | None, code: str, message: str, line: int | None = None) -> dict:
    error = {"code": code, "message": message}
    if line is not None:
        error["line"] = line
    return {
        "id": "batch_req-" + secrets.token_hex(12),
        "custom_id": custom_id,
        "response": None,
        "error": error,
    }


def _lines(platform: Platform, batch: dict, final: str) -> Iterator[tuple[bool, dict]]:
    """(goes to the output file, line) for every line of the batch."""
    for r in batch["rejects"] or []:
        yield False, refused(r["custom_id"], r["code"], f"line {r['line']}: {r['message']}", r["line"])
    for line in rows.results(platform.store, batch["id"]):
        if line["done"]:
            yield line["status_code"] == 200, answered(line)
        else:  # a cancelled or expired batch's unrun line
            code, message = UNRUN[final]
            yield False, refused(line["custom_id"], code, message)


def write(platform: Platform, batch: dict, final: str) -> tuple[str | None, str | None]:
    """(output_file_id, error_file_id) of the batch, written now or found from an earlier try; None for
    a file that would be empty."""
    spool = tempfile.SpooledTemporaryFile
    with spool(max_size=8 << 20) as ok, spool(max_size=8 << 20) as bad:
        for to_output, line in _lines(platform, batch, final):
            (ok if to_output else bad).write(json.dumps(line).encode() + b"\n")
        return _save(platform, batch, ok, "output"), _save(platform, batch, bad, "errors")


def _save(platform: Platform, batch: dict, data, kind: str) -> str | None:
    """The file of `data` (at its end) as the batch owner's file of purpose batch_output."""
    if data.tell() == 0:
        return None
    file_id = f"file-{batch['id'].split('-', 1)[1]}-{kind}"
    if platform.store.get(db.files, file_id) is not None:  # a blob is whole before its row is written
        return file_id
    data.seek(0)
    size, digest = platform.blobs.write(file_id, data, 1 << 62)
    created = db.now()
    row = {
        "id": file_id,
        "tenant": batch["tenant"],
        "filename": f"{batch['id']}_{kind}.jsonl",
        "purpose": "batch_output",
        "bytes": size,
        "sha256": digest,
        "created_at": created,
        "expires_at": created + batch["output_expires_s"] if batch["output_expires_s"] else None,
    }
    platform.store.insert(db.files, row)
    return file_id
