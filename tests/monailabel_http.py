"""HTTP calls to a MONAI Label server in tests: ``multipart/form-data`` bodies and requests that fail the test
with the server's log tail. Shared by ``test_monailabel.py`` and ``test_pacs.py``."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest


def multipart(fields: dict[str, str], files: dict[str, Path] | None = None) -> tuple[bytes, str]:
    """Encode form fields and files as ``multipart/form-data``; return the body and its content type."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in (files or {}).items():
        body.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        body.write(path.read_bytes() + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def request(server: dict, method: str, path: str, data: bytes | None = None, content_type: str | None = None,
            timeout: float = 600) -> bytes:
    """``method`` ``server["url"] + path`` with an optional body; the response body, or the test fails with the
    HTTP status and the tail of ``server["log"]``."""
    req = urllib.request.Request(server["url"] + path, data=data, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        log = Path(server["log"]).read_text()[-5000:]
        pytest.fail(f"{method} {path} -> HTTP {err.code}: {err.read()[:500]!r}\nserver log tail:\n{log}")
