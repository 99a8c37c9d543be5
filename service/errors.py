"""Client-facing errors: a code, a message, an HTTP status. Never a traceback."""

from __future__ import annotations


class ApiError(Exception):
    """An error the client caused (4xx) or should retry (503/504), answered as JSON."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def invalid_image(message: str) -> ApiError:
    return ApiError(400, "invalid_image", message)


def too_large(code: str, message: str) -> ApiError:
    return ApiError(413, code, message)


def unsupported_media_type(message: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", message)


def unprocessable(code: str, message: str) -> ApiError:
    return ApiError(422, code, message)


def not_found(code: str, message: str) -> ApiError:
    return ApiError(404, code, message)


def timed_out(message: str) -> ApiError:
    return ApiError(504, "timeout", message)


def shed(retry_after_s: int) -> ApiError:
    """A request admitted just before an overload began, refused before it reached a batch
    (service/middleware.py, AdmissionGate.refused)."""
    message = f"the service became overloaded while this request waited for a batch; retry after {retry_after_s} s"
    return ApiError(503, "overloaded", message, {"Retry-After": str(retry_after_s)})
