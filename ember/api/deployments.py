"""Fireworks' deployments under `/v1/accounts/{account}/deployments`, as the `fireworks-ai` SDK calls them: create,
get, list, PATCH, `:scale`, delete and `:undelete`. A deployment serves its base model under its own id
(`accounts/<a>/deployments/<id>`, or `<base>#accounts/<a>/deployments/<id>`) with its own engine: on one machine
a replica is one engine (ember.serving.deployments), so replica counts are 0 or 1. Rows live in the store and a
restarted server brings its deployments back.

States: CREATING (the first replica loads) → READY (also at zero replicas) or FAILED (the load failed; PATCH or
:scale tries again); UPDATING while a changed deployment's replica reloads; DELETING → DELETED (soft: :undelete
brings it back; `?hard=true` forgets it)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import Field, model_validator

from ember.api.batch.fireworks import check_id, rfc3339
from ember.api.datasets import masked, next_token, not_found, page_params
from ember.api.protocol import _Strict
from ember.api.state import store_of
from ember.serving.deployments import MAX_REPLICAS, Replicas
from ember.serving.errors import RequestError
from ember.serving.models import BUNDLED, FIREWORKS_PREFIX, ModelRegistry, ModelSpec
from ember.store import Store

router = APIRouter()

PREFIX = "/accounts/{account}/deployments"
# output-only fields of a Deployment, dropped when a client sends an object back
REPORTED = ("name", "createTime", "updateTime", "deleteTime", "purgeTime", "state", "status", "replicaCount",
            "replicaStats", "desiredReplicaCount", "region", "cluster", "directRouteHandle", "numPeftDeviceCached")
# what each precision means here (packed GGUF blocks when unspecified, as the base model is served)
PRECISIONS = {"PRECISION_UNSPECIFIED": None, "FP16": "float16", "BF16": "bfloat16"}
DEFAULT_SCALE_TO_ZERO = "3600s"  # Fireworks' default window
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h)")
SPEC_FIELDS = ("maxContextLength", "precision", "ngramSpeculationLength", "draftTokenCount", "baseModel",
               "disableSpeculativeDecoding")  # a change to one of these reloads the replica


def duration_s(text: str, param: str) -> float:
    """Google's Duration as JSON writes it ("3600s"; Ember also reads "5m", "1h")."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise RequestError(f"{param} {text!r} must be a duration such as \"300s\"", param)
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


class AutoscalingPolicy(_Strict):
    scaleToZeroWindow: str | None = None
    scaleUpWindow: str | None = None  # one replica at most: nothing to scale up to but the first
    scaleDownWindow: str | None = None
    loadTargets: dict[str, float] | None = None


class DeploymentBody(_Strict):
    """A create or PATCH body. The fields about accelerators, shapes, add-ons and routes of Fireworks' cloud
    take their neutral values only."""

    not_yet: ClassVar[dict[str, tuple]] = {
        "acceleratorType": ("ACCELERATOR_TYPE_UNSPECIFIED",), "acceleratorCount": (0, 1), "activeModelVersion": ("",),
        "targetModelVersion": ("",), "autoTune": ({},), "deploymentShape": ("",), "deploymentTemplate": ("",),
        "directRouteApiKeys": ([],), "directRouteType": ("DIRECT_ROUTE_TYPE_UNSPECIFIED",), "draftModel": ("",),
        "enableAddons": (False,), "enableHotLoad": (False,), "enableHotReloadLatestAddon": (False,),
        "enableMtp": (False,), "hotLoadBucketType": ("BUCKET_TYPE_UNSPECIFIED",), "hotLoadBucketUrl": ("",),
        "maxWithRevocableReplicaCount": (0,), "placement": ({},)}

    baseModel: str
    displayName: Annotated[str, Field(max_length=256)] | None = None
    description: Annotated[str, Field(max_length=4096)] | None = None
    minReplicaCount: Annotated[int, Field(ge=0)] | None = None
    maxReplicaCount: Annotated[int, Field(ge=0)] | None = None
    maxContextLength: Annotated[int, Field(ge=1)] | None = None
    precision: str | None = None
    ngramSpeculationLength: Annotated[int, Field(ge=1, le=64)] | None = None
    draftTokenCount: Annotated[int, Field(ge=1, le=16)] | None = None
    autoscalingPolicy: AutoscalingPolicy | None = None
    enableSessionAffinity: bool | None = None  # one replica: every request has affinity already
    disableDeploymentSizeValidation: bool | None = None
    expireTime: str | None = None  # deprecated by Fireworks; kept and reported
    pricingPlanId: str | None = None  # billing is Fireworks'; kept and reported

    @model_validator(mode="before")
    @classmethod
    def _drop_reported(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if k not in REPORTED} if isinstance(data, dict) else data


def _check(spec: dict[str, Any]) -> None:
    """What this machine can do with a deployment's fields: 400s naming them."""
    for field in ("minReplicaCount", "maxReplicaCount"):
        if spec.get(field, 0) > MAX_REPLICAS:
            raise RequestError(f"{field} {spec[field]} is more replicas than this server holds: at most {MAX_REPLICAS} "
                               "replica per deployment on one machine", field, code="unsupported_parameter")
    if spec.get("minReplicaCount", 0) > spec["maxReplicaCount"]:
        raise RequestError("minReplicaCount is larger than maxReplicaCount", "minReplicaCount")
    if spec.get("precision") not in (None, *PRECISIONS):
        raise RequestError(f"precision {spec['precision']} is not supported by this server (it serves "
                           f"{', '.join(PRECISIONS)})", "precision", code="unsupported_parameter")
    param = "autoscalingPolicy.scaleToZeroWindow"
    window = (spec.get("autoscalingPolicy") or {}).get("scaleToZeroWindow")
    if window is not None and duration_s(window, param) <= 0:
        raise RequestError(f"{param} must be positive", param)


def model_spec(registry: ModelRegistry, name: str, spec: dict[str, Any]) -> ModelSpec:
    """The engine a deployment's replica runs: its base model's (a served model, a bundled one, or a local GGUF
    file or Hugging Face folder), with the deployment's context length, precision and speculation."""
    base = spec["baseModel"].removeprefix(FIREWORKS_PREFIX)
    served = registry.specs.get(base)
    if served is not None:
        engine, generation_config = served.engine, served.generation_config
    elif base in BUNDLED or (Path(base).is_absolute() and Path(base).exists()):
        engine, generation_config = dataclasses.replace(registry.default_engine, model=base), None
    else:
        raise RequestError(f"baseModel {spec['baseModel']!r} is neither a model this server serves "
                           f"({', '.join(sorted(registry.specs))}), a bundled one ({', '.join(sorted(BUNDLED))}) "
                           "nor an absolute path to a GGUF file or Hugging Face folder", "baseModel")
    changes: dict[str, Any] = {"max_model_len": spec.get("maxContextLength") or engine.max_model_len}
    if PRECISIONS.get(spec.get("precision") or "PRECISION_UNSPECIFIED"):
        changes["weights"] = PRECISIONS[spec["precision"]]
    if spec.get("disableSpeculativeDecoding"):
        changes["speculation"] = "off"
    if spec.get("ngramSpeculationLength"):
        changes["ngram_max"] = spec["ngramSpeculationLength"]
    if spec.get("draftTokenCount"):
        changes["max_draft_tokens"] = spec["draftTokenCount"]
    return ModelSpec(name, dataclasses.replace(engine, **changes), generation_config)


def _idle_s(spec: dict[str, Any]) -> float | None:
    """The scale-to-zero window, when the deployment may go to zero replicas."""
    if spec.get("minReplicaCount", 0) > 0:
        return None
    window = (spec.get("autoscalingPolicy") or {}).get("scaleToZeroWindow") or DEFAULT_SCALE_TO_ZERO
    return duration_s(window, "autoscalingPolicy.scaleToZeroWindow")


def _first_replicas(spec: dict[str, Any]) -> int:
    """Replicas a deployment starts with (created or undeleted): its minimum, and at least one when it may have one."""
    return max(spec.get("minReplicaCount", 0), min(1, spec["maxReplicaCount"]))


def _name(row: dict[str, Any]) -> str:
    return f"accounts/{row['account']}/deployments/{row['id']}"


def deployment_object(row: dict[str, Any], replicas: Replicas) -> dict[str, Any]:
    spec = row["spec"]
    ready, initializing = replicas.replica_counts(_name(row)) if row["deleted_at"] is None else (0, 0)
    policy = {"scaleToZeroWindow": DEFAULT_SCALE_TO_ZERO, "scaleUpWindow": "30s", "scaleDownWindow": "600s",
              **(spec.get("autoscalingPolicy") or {})}
    obj = {"name": _name(row), "displayName": spec.get("displayName", ""), "description": spec.get("description", ""),
           "createTime": rfc3339(row["created_at"]), "updateTime": rfc3339(row["updated_at"]),
           "state": row["state"], "status": {"code": "INTERNAL" if row["state"] == "FAILED" else "OK",
                                             "message": row["message"] or ""},
           "baseModel": spec["baseModel"], "minReplicaCount": spec.get("minReplicaCount", 0),
           "maxReplicaCount": spec["maxReplicaCount"], "desiredReplicaCount": row["replica_count"],
           "replicaCount": ready, "autoscalingPolicy": policy,
           "replicaStats": {"readyReplicaCount": ready, "initializingReplicaCount": initializing,
                            "pendingSchedulingReplicaCount": 0, "downloadingModelReplicaCount": 0},
           "precision": spec.get("precision") or "PRECISION_UNSPECIFIED",
           "acceleratorType": "ACCELERATOR_TYPE_UNSPECIFIED", "acceleratorCount": 0,
           **{k: spec[k] for k in ("maxContextLength", "ngramSpeculationLength", "draftTokenCount",
                                   "enableSessionAffinity", "expireTime", "pricingPlanId") if k in spec}}
    if row["deleted_at"] is not None:
        obj["deleteTime"] = rfc3339(row["deleted_at"])
    return obj


class DeploymentControl:
    """Between the rows and the replicas: applies a row to the replicas and records what the replicas report.
    Report callbacks run on the replicas' loader threads (the store's calls are plain transactions)."""

    def __init__(self, store: Store, registry: ModelRegistry) -> None:
        self.store, self.registry = store, registry
        self.replicas = Replicas(self._event, registry.loaded)
        registry.deployments = self.replicas

    def apply(self, row: dict[str, Any]) -> None:
        spec = row["spec"]
        self.replicas.set(_name(row), model_spec(self.registry, _name(row), spec), row["replica_count"],
                          spec["maxReplicaCount"], _idle_s(spec))

    def restore(self) -> None:
        """A starting server's deployments: each one not deleted, as its row says (a half-done delete ends)."""
        for row in self.store.deployments.live():
            if row["state"] == "DELETING":
                self.store.deployments.update(row["account"], row["id"], state="DELETED", deleted_at=time.time())
                continue
            if _settled(row["state"], row["replica_count"]) != row["state"] and not row["replica_count"]:
                row = self.store.deployments.update(row["account"], row["id"], state="READY")  # a load cut short
            try:
                self.apply(row)
            except RequestError as exc:  # its base model is no longer served
                self.store.deployments.update(row["account"], row["id"], state="FAILED", message=exc.message)

    def _event(self, name: str, event: str, detail: str | None) -> None:
        _, account, _, deployment_id = name.split("/")
        row = self.store.deployments.get(account, deployment_id)
        if row is None or row["deleted_at"] is not None:
            return
        now = time.time()
        if event == "ready":
            self.store.deployments.update(account, deployment_id, state="READY", message=None, replica_count=1,
                                          updated_at=now)
        elif event == "failed":
            self.store.deployments.update(account, deployment_id, state="FAILED", message=detail, updated_at=now)
        elif event == "unloaded":  # scaled to zero (idle, or asked)
            state = "READY" if row["state"] in ("CREATING", "UPDATING") else row["state"]
            self.store.deployments.update(account, deployment_id, replica_count=0, state=state, updated_at=now)


def _control(request: Request) -> tuple[Store, DeploymentControl]:
    store = store_of(request)
    return store, request.app.state.deployments


async def _row(request: Request, account: str, deployment_id: str, deleted_ok: bool = False) -> dict[str, Any]:
    store, _ = _control(request)
    account, deployment_id = check_id(account, "account_id"), check_id(deployment_id, "deployment_id")
    row = await asyncio.to_thread(store.deployments.get, account, deployment_id)
    if row is None or (row["deleted_at"] is not None and not deleted_ok):
        raise not_found("deployment", f"accounts/{account}/deployments/{deployment_id}")
    return row


def _settled(state: str, replicas: int) -> str:
    """The state of a deployment that now wants `replicas`: a FAILED one tries again; at zero, a load under way is
    dropped and nothing will report it ready, so a CREATING or UPDATING one is READY (at zero replicas) at once."""
    if replicas and state == "FAILED":
        return "CREATING"
    return "READY" if not replicas and state in ("CREATING", "UPDATING") else state


def _spec(body: DeploymentBody, disable_speculation: bool | None) -> dict[str, Any]:
    spec = body.model_dump(exclude_none=True)
    spec.setdefault("minReplicaCount", 0)
    spec.setdefault("maxReplicaCount", max(spec["minReplicaCount"], 1))
    if disable_speculation:
        spec["disableSpeculativeDecoding"] = True
    _check(spec)
    return spec


@router.post(PREFIX)
async def create_deployment(account: str, body: DeploymentBody, request: Request,
                            deploymentId: str | None = None, disableAutoDeploy: bool = False,  # noqa: N803
                            disableSpeculativeDecoding: bool | None = None, validateOnly: bool = False,  # noqa: N803
                            skipShapeValidation: bool = False, skipImageTagValidation: bool = False,  # noqa: N803, ARG001
                            acceptShapelessRisk: bool = False) -> dict:  # noqa: N803, ARG001
    """`disableAutoDeploy` creates it at zero replicas; `validateOnly` checks and answers without creating."""
    store, control = _control(request)
    account = check_id(account, "account_id")
    deployment_id = check_id(deploymentId or f"d-{uuid.uuid4().hex[:12]}", "deploymentId")
    spec = _spec(body, disableSpeculativeDecoding)
    name, now = f"accounts/{account}/deployments/{deployment_id}", time.time()
    model_spec(control.registry, name, spec)  # a 400 naming baseModel before anything is made
    replicas = 0 if disableAutoDeploy else _first_replicas(spec)
    row = {"account": account, "id": deployment_id, "created_at": now, "updated_at": now, "deleted_at": None,
           "state": "CREATING" if replicas else "READY", "replica_count": replicas, "message": None, "spec": spec}
    if validateOnly:
        return deployment_object(row, control.replicas)
    if not await asyncio.to_thread(store.deployments.create, row):
        raise RequestError(f"deployment {name} already exists (a deleted one can be undeleted or deleted with "
                           "hard=true)", "deploymentId", 409, "ALREADY_EXISTS")
    control.apply(row)
    return deployment_object(row, control.replicas)


@router.get(PREFIX + "/{deployment_id}")
async def get_deployment(account: str, deployment_id: str, request: Request,
                         readMask: str | None = None) -> dict:  # noqa: N803
    row = await _row(request, account, deployment_id, deleted_ok=True)
    return masked(deployment_object(row, request.app.state.deployments.replicas), readMask)


@router.get(PREFIX)
async def list_deployments(account: str, request: Request,
                           pageSize: Annotated[int | None, Query(ge=0)] = None,  # noqa: N803
                           pageToken: str | None = None, filter: str | None = None,  # noqa: N803, A002
                           orderBy: str | None = None, readMask: str | None = None,  # noqa: N803
                           showDeleted: bool = False) -> dict:  # noqa: N803
    store, control = _control(request)
    offset, limit, _, _ = page_params(pageSize, pageToken, filter, orderBy, ("createTime",))
    rows, total = await asyncio.to_thread(store.deployments.list, check_id(account, "account_id"), offset, limit,
                                          showDeleted)
    return {"deployments": [masked(deployment_object(r, control.replicas), readMask) for r in rows],
            "nextPageToken": next_token(offset, limit, total), "totalSize": total}


class ScaleBody(_Strict):
    replicaCount: Annotated[int, Field(ge=0)] = 0


@router.patch(PREFIX + "/{deployment_id}:scale")
async def scale_deployment(account: str, deployment_id: str, body: ScaleBody, request: Request) -> dict:
    """0 unloads the replica (its requests in flight finish first); 1 loads it."""
    store, control = _control(request)
    row = await _row(request, account, deployment_id)
    limit = min(MAX_REPLICAS, row["spec"]["maxReplicaCount"])
    if body.replicaCount > limit:
        raise RequestError(f"replicaCount {body.replicaCount} is more than this deployment can have: at most {limit} "
                           f"(maxReplicaCount {row['spec']['maxReplicaCount']}; one machine holds {MAX_REPLICAS} "
                           "replica per deployment)", "replicaCount", code="unsupported_parameter")
    state = _settled(row["state"], body.replicaCount)
    row = await asyncio.to_thread(store.deployments.update, row["account"], row["id"], replica_count=body.replicaCount,
                                  state=state, updated_at=time.time())
    control.apply(row)
    return {}


@router.patch(PREFIX + "/{deployment_id}")  # after :scale, which this path would match too
async def update_deployment(account: str, deployment_id: str, body: DeploymentBody, request: Request) -> dict:
    """The fields sent replace the deployment's; a change to what its engine runs reloads its replica (UPDATING)."""
    store, control = _control(request)
    row = await _row(request, account, deployment_id)
    sent = body.model_dump(exclude_none=True)
    spec = {**row["spec"], **sent}
    spec["maxReplicaCount"] = sent.get("maxReplicaCount", max(spec["maxReplicaCount"], spec.get("minReplicaCount", 0)))
    _check(spec)
    model_spec(control.registry, _name(row), spec)
    replicas = min(max(row["replica_count"], spec.get("minReplicaCount", 0)), spec["maxReplicaCount"])
    reload = bool(replicas and row["replica_count"]) and any(spec.get(k) != row["spec"].get(k) for k in SPEC_FIELDS)
    state = "UPDATING" if reload else _settled(row["state"], replicas)
    row = await asyncio.to_thread(store.deployments.update, row["account"], row["id"], spec=spec, state=state,
                                  replica_count=replicas, updated_at=time.time(), message=None)
    control.apply(row)
    return deployment_object(row, control.replicas)


@router.delete(PREFIX + "/{deployment_id}")
async def delete_deployment(account: str, deployment_id: str, request: Request, hard: bool = False,
                            ignoreChecks: bool = False) -> dict:  # noqa: N803, ARG001
    """The replica stops taking requests at once and drains; the row stays as DELETED unless `hard`."""
    store, control = _control(request)
    row = await _row(request, account, deployment_id, deleted_ok=hard)
    await asyncio.to_thread(store.deployments.update, row["account"], row["id"], state="DELETING")
    control.replicas.remove(_name(row))
    if hard:
        await asyncio.to_thread(store.deployments.delete, row["account"], row["id"])
    else:
        await asyncio.to_thread(store.deployments.update, row["account"], row["id"], state="DELETED",
                                deleted_at=time.time(), replica_count=0, updated_at=time.time())
    return {}


@router.post(PREFIX + "/{deployment_id}:undelete")
async def undelete_deployment(account: str, deployment_id: str, request: Request) -> dict:
    store, control = _control(request)
    row = await _row(request, account, deployment_id, deleted_ok=True)
    if row["deleted_at"] is None:
        raise RequestError(f"deployment {_name(row)} is not deleted", None, 400, "FAILED_PRECONDITION")
    spec = row["spec"]
    model_spec(control.registry, _name(row), spec)
    replicas = _first_replicas(spec)
    row = await asyncio.to_thread(store.deployments.update, row["account"], row["id"], deleted_at=None,
                                  state="CREATING" if replicas else "READY", replica_count=replicas,
                                  updated_at=time.time(), message=None)
    control.apply(row)
    return deployment_object(row, control.replicas)


def install(app: FastAPI, registry: ModelRegistry, store: Store | None) -> DeploymentControl | None:
    """The control plane of a server with a store (none: its routes answer 404, as every stored object's do)."""
    control = DeploymentControl(store, registry) if store is not None else None
    app.state.deployments = control
    return control


async def reap_idle(control: DeploymentControl, interval: float = 1.0) -> None:
    """Scale to zero: each second, replicas idle past their deployment's window unload."""
    while True:
        await asyncio.sleep(interval)
        control.replicas.reap()

