"""A refused request, answered as OpenAI's API answers one: its HTTP status and

    {"error": {"message": "...", "type": "invalid_request_error", "param": "model",
               "code": "model_not_found"}}

so the official `openai` client raises the matching exception (BadRequestError,
AuthenticationError, NotFoundError, ...) whose message carries the text and whose `param` and
`code` are set.
"""

from __future__ import annotations

# OpenAI's error types by status; a request's fault is an invalid_request_error there, whatever
# the status (a wrong key included).
SERVER_ERROR = "server_error"
REQUEST_ERROR = "invalid_request_error"


class ServingError(ValueError):
    """A request this server refuses: the message says what is wrong and what to send instead;
    `param` names the request's field (None when it is not one), `code` is OpenAI's machine
    name for the case where it has one (model_not_found, context_length_exceeded,
    invalid_api_key)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    @property
    def type(self) -> str:
        return SERVER_ERROR if self.status >= 500 else REQUEST_ERROR

    def payload(self) -> dict:
        """The response body: OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def from_mlx_lm(err: Exception, body: dict) -> ServingError:
    """mlx-lm's own refusal of a request (its messages start with the field's name, as
    "max_tokens must be at least 1") as a ServingError naming that field when the request
    has it."""
    if isinstance(err, ServingError):
        return err
    text = str(err)
    first = text.split(" ", 1)[0]
    return ServingError(text, param=first if first in body else None)
