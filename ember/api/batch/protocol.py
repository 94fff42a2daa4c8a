"""Request bodies of the batch endpoints: OpenAI's batches, Fireworks' datasets and batch inference jobs. Strict
as the generation bodies are; the fields Fireworks' resources only report (name, state, createTime, ...) are
accepted and ignored, as its API does, so an object read back can be sent again."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from ember.api.protocol import _Strict
from ember.serving.errors import FieldError

MAX_WINDOW_S = 24 * 3600  # OpenAI's and Fireworks' window; shorter ones are Ember's (tests, quick jobs)
_WINDOW = re.compile(r"([1-9][0-9]{0,5})([smh])")
REPORTED = ("name", "createTime", "updateTime", "createdBy", "state", "status")  # output-only fields


def window_seconds(window: str) -> int:
    """"24h", or Ember's shorter "30m" / "90s": the job's deadline after its creation."""
    m = _WINDOW.fullmatch(window)
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)] if m else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise FieldError("completion_window", f"completion_window {window!r} must be \"24h\" (or a shorter window "
                                              "such as \"30m\" or \"90s\")")
    return seconds


class _Reported(_Strict):
    """Drops the output-only fields a client may send back."""

    @model_validator(mode="before")
    @classmethod
    def _drop_reported(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if k not in REPORTED} if isinstance(data, dict) else data


class ExpiresAfter(_Strict):
    anchor: Literal["created_at"]
    seconds: Annotated[int, Field(ge=3600, le=30 * 86400)]


class BatchCreate(_Strict):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    output_expires_after: ExpiresAfter | None = None

    @model_validator(mode="after")
    def _check(self) -> BatchCreate:
        window_seconds(self.completion_window)
        if any(len(k) > 64 for k in self.metadata or {}):
            raise FieldError("metadata", "metadata keys have at most 64 characters")
        return self


class InferenceParameters(_Strict):
    maxTokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    topP: Annotated[float, Field(ge=0, le=1)] | None = None
    topK: Annotated[int, Field(ge=0, le=100)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    extraBody: str | None = None  # more request fields, as a JSON object in a string

    def defaults(self) -> dict[str, Any]:
        """The body fields every line gets unless it sets them itself."""
        extra: Any = {}
        if self.extraBody:
            try:
                extra = json.loads(self.extraBody)
            except json.JSONDecodeError as exc:
                raise FieldError("extraBody", f"extraBody is not valid JSON: {exc}") from exc
            if not isinstance(extra, dict):
                raise FieldError("extraBody", "extraBody must be a JSON object of request fields")
            if extra.get("stream"):  # a line's answer is stored whole: a stream's chunks would be kept as its answer
                raise FieldError("extraBody", "a batch request is not streamed: leave `stream` out of extraBody")
        named = {"max_tokens": self.maxTokens, "temperature": self.temperature, "top_p": self.topP,
                 "top_k": self.topK, "n": self.n}
        return {**extra, **{k: v for k, v in named.items() if v is not None}}


class BatchJobCreate(_Reported):
    not_yet: ClassVar[dict[str, tuple]] = {"continuedFromJobName": ("",), "precision": ("PRECISION_UNSPECIFIED",)}

    model: str
    inputDatasetId: str
    outputDatasetId: str | None = None
    displayName: Annotated[str, Field(max_length=256)] | None = None
    inferenceParameters: InferenceParameters | None = None
    jobProgress: dict | None = None  # reported only


class DatasetSpec(_Reported):
    # data Ember cannot fetch or derive: a dataset's rows come from an upload
    not_yet: ClassVar[dict[str, tuple]] = {"externalUrl": ("",), "splitted": (), "transformed": (),
                                           "evalProtocol": (), "evaluationResult": ()}

    displayName: Annotated[str, Field(max_length=256)] | None = None
    exampleCount: str | None = None
    format: Literal["FORMAT_UNSPECIFIED", "CHAT", "COMPLETION", "RL"] | None = None
    userUploaded: dict | None = None
    sourceJobName: str | None = None
    estimatedTokenCount: str | None = None  # reported only
    averageTurnCount: float | None = None  # reported only

    def meta(self) -> dict[str, Any]:
        return self.model_dump(include={"displayName", "format", "userUploaded", "sourceJobName"}, exclude_none=True)


class DatasetCreate(_Strict):
    not_yet: ClassVar[dict[str, tuple]] = {"sourceDatasetId": ("",)}

    datasetId: str
    dataset: DatasetSpec


class UploadEndpointRequest(_Strict):
    filenameToSize: Annotated[dict[str, str], Field(min_length=1, max_length=1000)]  # sizes in bytes, as strings
    readMask: str | None = None
