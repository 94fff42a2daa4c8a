"""Backpressure: a model admits at most its running batch plus a bounded waiting line; a request past
that is refused at once with a 429 (and a retry hint) instead of queueing without end."""

from __future__ import annotations

import threading

from ember.serving.errors import RequestError

RETRY_AFTER_S = 1.0  # what a refused client is told to wait: about one batch's worth of progress


class Ticket:
    """One admitted request's place; release() (idempotent) frees it when its generation ends or aborts."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False

    def release(self) -> None:
        with self._admission.lock:
            if not self._released:
                self._released = True
                self._admission.active -= 1


class Admission:
    """Counts a model's admitted, unfinished requests (a request with n samples or several prompts
    counts once). The limit comes with each call: it is the server's setting, not the model's."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0

    def admit(self, limit: int) -> Ticket:
        with self.lock:
            if self.active >= limit:
                raise RequestError(f"this model already has {self.active} requests running or waiting (its "
                                   "limit); retry later", status=429, code="too_many_requests",
                                   retry_after=RETRY_AFTER_S)
            self.active += 1
        return Ticket(self)
