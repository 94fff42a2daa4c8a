"""Deployments' replicas on this machine: a replica is one engine of the deployment's base model, loaded and
unloaded in a thread of its own so that requests and the event loop never wait for it.

The control plane (ember.api.deployments) says how many replicas each deployment should have (0 or 1 here) and
persists what happens; this module only keeps the engines: a request for a deployment at zero replicas starts
a load (scale from zero) and, like every request while a replica loads, gets a 503 with `retry-after`; a replica
unused for its deployment's idle window is unloaded (scale to zero); an unloaded replica's requests in flight get
DRAIN_S to finish first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.serving.errors import RequestError
from ember.serving.models import Model, ModelSpec, close_model, load_served_model

log = logging.getLogger("ember.serving")

MAX_REPLICAS = 1  # per deployment on one machine (the scale-out issue places more on a cluster)
DRAIN_S = 30.0  # an unloaded replica's requests in flight get this long before they are aborted
FIRST_LOAD_GUESS_S = 5.0  # the retry-after of a deployment's first load, before one was measured


@dataclass
class _Deployment:
    spec: ModelSpec
    replicas: int  # wanted now: 0 or 1
    max_replicas: int  # a request at zero replicas loads one when this allows
    idle_s: float | None  # scale to zero after this long without a request (None: never)
    model: Model | None = None
    loading: bool = False
    error: str | None = None  # why the last load failed
    last_used: float = field(default_factory=time.monotonic)
    load_s: float = FIRST_LOAD_GUESS_S  # how long the last load took: the retry-after while one runs
    generation: int = 0  # changes with every new wish: a load that finishes for an older one is dropped


class Replicas:
    """The deployments' engines, by deployment name (`accounts/<a>/deployments/<id>`). Thread-safe; the
    callbacks run on the thread that loaded or unloaded: `on_event(name, "ready" | "failed" | "unloaded",
    detail)` and `on_loaded(model)` (metrics hook in there)."""

    def __init__(self, on_event: Callable[[str, str, str | None], None] = lambda *_: None,
                 on_loaded: Callable[[Model], None] = lambda _: None) -> None:
        self._lock = threading.Lock()
        self._deployments: dict[str, _Deployment] = {}
        self.on_event, self.on_loaded = on_event, on_loaded

    def set(self, name: str, spec: ModelSpec, replicas: int, max_replicas: int, idle_s: float | None) -> None:
        """Create or change a deployment: a changed spec reloads its replica; replicas 0 unloads it, 1 loads it."""
        with self._lock:
            d = self._deployments.get(name)
            if d is None:
                d = self._deployments[name] = _Deployment(spec, replicas, max_replicas, idle_s)
            reload = d.spec != spec
            d.spec, d.replicas, d.max_replicas, d.idle_s = spec, replicas, max_replicas, idle_s
            self._converge(name, d, reload)

    def remove(self, name: str) -> None:
        """Forget a deployment; its replica, if any, drains and stops."""
        with self._lock:
            d = self._deployments.pop(name, None)
            if d is not None:
                d.generation += 1
                self._drop(name, d, notify=False)

    def resolve(self, name: str) -> Model:
        """The deployment's ready replica; else a 503 (loading it first when it is at zero replicas and may grow)
        or a 404 (no such deployment)."""
        with self._lock:
            d = self._deployments.get(name)
            if d is None:
                raise RequestError(f"deployment `{name}` not found", "model", status=404, code="model_not_found")
            d.last_used = time.monotonic()
            if d.model is not None and not d.loading:
                return d.model
            if d.error is not None and not d.loading:  # no reload per request: a PATCH or :scale tries again
                raise RequestError(f"deployment `{name}` failed to load: {d.error}", "model", status=503,
                                   code="deployment_failed")
            if not d.loading and d.max_replicas > 0:
                d.replicas = 1  # scale from zero
                self._converge(name, d, False)
            if d.loading:
                raise RequestError(f"deployment `{name}` is loading its replica; retry shortly", "model", status=503,
                                   code="model_loading", retry_after=d.load_s)
            raise RequestError(f"deployment `{name}` has no replica (maxReplicaCount 0); scale it up first", "model",
                               status=503, code="deployment_scaled_to_zero")

    def replica_counts(self, name: str) -> tuple[int, int]:
        """(ready, initializing) replicas of a deployment."""
        with self._lock:
            d = self._deployments.get(name)
            if d is None:
                return 0, 0
            return int(d.model is not None and not d.loading), int(d.loading)

    def loaded(self) -> list[Model]:
        with self._lock:
            return [d.model for d in self._deployments.values() if d.model is not None and not d.loading]

    def reap(self) -> None:
        """Unload replicas idle for longer than their window."""
        now = time.monotonic()
        with self._lock:
            for name, d in self._deployments.items():
                busy = d.model is not None and d.model.admission.active > 0
                if busy:
                    d.last_used = now
                elif d.model is not None and not d.loading and d.idle_s is not None and now - d.last_used > d.idle_s:
                    d.replicas = 0
                    self._converge(name, d, False)

    def close(self) -> None:
        """Stop every replica now (the server is stopping: its HTTP side has drained already)."""
        with self._lock:
            models = [d.model for d in self._deployments.values() if d.model is not None]
            for d in self._deployments.values():
                d.generation += 1
            self._deployments.clear()
        for model in models:
            close_model(model)

    # -- under the lock ------------------------------------------------------------------------------------------

    def _converge(self, name: str, d: _Deployment, reload: bool) -> None:
        if d.replicas == 0 or reload:
            d.generation += 1
            self._drop(name, d, notify=d.replicas == 0)
        if d.replicas > 0 and d.model is None and not d.loading:
            d.generation += 1
            d.loading, d.error = True, None
            self._spawn(self._load, name, d, d.generation)

    def _drop(self, name: str, d: _Deployment, notify: bool) -> None:
        model, d.model, d.loading = d.model, None, False
        if model is not None:
            self._spawn(self._unload, name, d, model, notify)

    def _spawn(self, target: Callable, *args: object) -> None:
        threading.Thread(target=target, args=args, name="ember-replica", daemon=True).start()

    # -- on a thread of their own --------------------------------------------------------------------------------

    def _load(self, name: str, d: _Deployment, generation: int) -> None:
        started = time.monotonic()
        try:
            model = load_served_model(d.spec.engine, name, d.spec.generation_config)
        except Exception as exc:  # a bad file, too little memory: the deployment fails, the server goes on
            log.exception("replica load failed", extra={"model": name})
            with self._lock:
                current = d.generation == generation
                if current:
                    d.loading, d.error = False, f"{type(exc).__name__}: {exc}"
            if current:
                self.on_event(name, "failed", f"{type(exc).__name__}: {exc}")
            return
        model.engine.start()
        with self._lock:
            current = d.generation == generation and self._deployments.get(name) is d
            if current:
                d.model, d.loading, d.last_used = model, False, time.monotonic()
                d.load_s = time.monotonic() - started
        if not current:  # scaled down, changed or deleted while it loaded
            close_model(model)
            return
        log.info("replica ready", extra={"model": name, "seconds": round(time.monotonic() - started, 2)})
        self.on_loaded(model)
        self.on_event(name, "ready", None)

    def _unload(self, name: str, d: _Deployment, model: Model, notify: bool) -> None:
        deadline = time.monotonic() + DRAIN_S
        while model.admission.active > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        close_model(model)
        log.info("replica unloaded", extra={"model": name})
        with self._lock:  # no report when it was scaled up again (or deleted) while this replica drained
            still_zero = d.replicas == 0 and d.model is None and not d.loading and self._deployments.get(name) is d
        if notify and still_zero:
            self.on_event(name, "unloaded", None)
