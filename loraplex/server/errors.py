"""One exception type for every refusal the API makes, carrying its HTTP status and OpenAI body."""

from __future__ import annotations

from loraplex.server.protocol import error_body

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
          404: "NotFoundError", 413: "BadRequestError", 429: "RateLimitError",
          500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, _TYPES.get(self.status, "APIError"), self.status,
                          self.param)


def model_not_found(name: str) -> APIError:
    # The same words for "never existed", "unloaded" and "outside --lora-dir": a client cannot
    # probe the filesystem or other adapters through this message.
    return APIError(404, f"The model `{name}` does not exist.", "model")
