"""The one exception type the SIP core raises for bad input."""


class SipError(ValueError):
    """A message (or part of one) that cannot be accepted.

    ``status`` is the response a server should answer a request with
    (400, 416, 420, 505, ...); ``reason`` is the reason phrase, which says
    what exactly was wrong so that a peer's operator can fix it.
    """

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
