"""The HTTP API of ``ce-ray serve``: request and response models, limits and errors.

The models are the spec. FastAPI validates every request against them (a wrong type, a missing or
unknown field, an empty text → 422 naming the field) and publishes them at ``/docs``. Limits that
depend on the server's config (documents per request, characters per text) are checked by
:func:`check_rerank` / :func:`check_predict` (→ 413). Every error the API returns has one shape::

    {"error": {"type": "too_large", "field": "documents", "message": "documents: 1200 documents, at most 1000"}}

``/rerank`` follows the Cohere/Infinity shape: request ``{query, documents, top_n?, return_documents?}``,
response ``{results: [{index, relevance_score, document?}], model, usage}`` sorted by score.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ce_ray.config import ServeConfig
from ce_ray.serving.catalog import Catalog

__all__ = [
    "ApiError",
    "ErrorResponse",
    "HealthResponse",
    "InfoResponse",
    "PredictRequest",
    "PredictResponse",
    "PredictResult",
    "RerankRequest",
    "RerankResponse",
    "RerankResult",
    "ServeStats",
    "ServeTotals",
    "ServedModel",
    "COHERE_UNSUPPORTED",
    "ModelVersion",
    "chunks_per_doc",
    "CohereRerankRequest",
    "CohereRerankResponse",
    "TeiRerankRequest",
    "TeiRerankResult",
    "check_predict",
    "check_rerank",
    "field_name",
    "key_ok",
]


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
class ApiError(Exception):
    """A request the API refuses: HTTP status, a short machine-readable type, the field at fault.

    Raised by the checks below and by the model deployment; the ingress maps it to
    :class:`ErrorResponse` in one exception handler. ``message`` is written for clients: it never
    contains exception text.
    """

    def __init__(
        self,
        status_code: int,
        type: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.type = type
        self.message = message
        self.field = field
        self.headers = headers

    def __reduce__(self):  # keep every attribute when the error crosses a Ray process boundary
        return (ApiError, (self.status_code, self.type, self.message, self.field, self.headers))


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the field in the request body, e.g. documents.3.")
    message: str


class ErrorDetail(BaseModel):
    type: str = Field(
        description="invalid_request, invalid_json, unsupported_media_type, too_large, timeout, unauthorized, "
        "model_not_found, wrong_model_kind, not_found, overloaded or internal_error."
    )
    message: str = Field(description="What was wrong, naming the field.")
    field: str | None = Field(None, description="The (first) field at fault; 'body' for the body as a whole.")
    errors: list[FieldError] | None = Field(None, description="Every field error, for validation errors.")


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorDetail


def field_name(loc: tuple | list) -> str:
    """A validation error location as a dotted field name: ``("body", "documents", 3)`` → ``documents.3``."""
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


# --------------------------------------------------------------------------------------------
# requests and responses
# --------------------------------------------------------------------------------------------
# Characters that show nothing: controls (Cc: NUL, ...), format characters (Cf: zero-width space, BOM,
# bidi marks, ...), separators (Z*). A text made only of these has nothing to rank.
_INVISIBLE = frozenset(("Cc", "Cf", "Zs", "Zl", "Zp"))


def _visible_text(value: str) -> str:
    """A text must be valid Unicode (no lone surrogates such as JSON ``"\\ud800"``) and show something."""
    import unicodedata

    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"not valid Unicode: a lone surrogate (U+{ord(value[exc.start]):04X}) at character {exc.start}"
        ) from None
    if not any(not ch.isspace() and unicodedata.category(ch) not in _INVISIBLE for ch in value):
        raise ValueError("must not be empty, only whitespace or only invisible characters (zero-width, BOM, NUL...)")
    return value


Text = Annotated[StrictStr, AfterValidator(_visible_text)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(
        None,
        description="Model to use. Optional; when given it must name a served model (its name in GET /info, or "
        "the path it was started with), else 404.",
    )


class RerankRequest(_Request):
    """Score each document against the query; results come back best first."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "query": "How many people live in Berlin?",
                    "documents": [
                        "Berlin has a population of 3,520,031 registered inhabitants.",
                        "Berlin is well known for its museums.",
                    ],
                    "top_n": 1,
                    "return_documents": True,
                }
            ]
        },
    )
    query: Text = Field(description="The search query.")
    documents: list[Text] = Field(
        min_length=1, description="Texts to rank (at most serve.max_documents; see GET /info)."
    )
    top_n: StrictInt | None = Field(None, ge=1, description="Return only the best N results (default: all).")
    return_documents: StrictBool = Field(False, description="Include each document's text in its result.")
    raw_scores: StrictBool = Field(False, description="Return the model's logits instead of sigmoid scores.")
    max_chunks_per_doc: StrictInt | None = Field(
        None,
        ge=1,
        description="Split a document longer than the model's window into at most this many windows, each with the "
        "query, and score it as its best window (1 = cut it at the window). Default and upper bound: the server's "
        "serve.max_chunks_per_doc (GET /info, limits); default 1 where serve.long_documents is truncate.",
    )
    max_tokens_per_doc: StrictInt | None = Field(
        None, ge=1, description="Cut each document to this many tokens before it is chunked or truncated."
    )


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="Relevance in [0, 1] (sigmoid of the logit, as CrossEncoder.rank).")
    document: str | None = Field(None, description="The document text, when return_documents was true.")


class RerankUsage(BaseModel):
    documents: int = Field(description="Documents scored.")
    total_tokens: int = Field(description="Tokens the model read (query + document pairs, after truncation).")
    truncated_documents: int = Field(
        description="Documents of which some tokens were not scored: longer than the model's max length (see GET "
        "/info) and cut, or longer than their chunks (max_chunks_per_doc) or max_tokens_per_doc."
    )
    chunks: int | None = Field(None, description="Windows scored (query + part of a document); with chunking only.")


class RerankResponse(BaseModel):
    results: list[RerankResult]
    model: str = Field(description="The served model.")
    usage: RerankUsage


class PredictRequest(_Request):
    """Classify text pairs (NLI: premise, hypothesis) with the model's labels."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"pairs": [["A man is eating pizza", "A man eats something"], ["A cat sleeps", "A dog barks"]]}
            ]
        },
    )
    pairs: list[Annotated[list[Text], Field(min_length=2, max_length=2)]] = Field(
        min_length=1, description="[first, second] text pairs (at most serve.max_pairs; see GET /info)."
    )


class PredictResult(BaseModel):
    label: str | None = Field(None, description="Most likely class name (classifiers only).")
    label_id: int | None = Field(None, description="Its index (classifiers only).")
    score: float = Field(description="Probability of that class; for 1-output models the sigmoid score.")
    probabilities: dict[str, float] | None = Field(None, description="Softmax probability of every class.")


class PredictUsage(BaseModel):
    pairs: int
    total_tokens: int = Field(description="Tokens the model read, after truncation.")
    truncated_pairs: int = Field(description="Pairs longer than the model's max length; they were cut to fit.")


class PredictResponse(BaseModel):
    results: list[PredictResult] = Field(description="One result per pair, in request order.")
    model: str
    usage: PredictUsage


def key_ok(expected: str | None, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header value carries the server's key (always, for a server without one)."""
    if expected is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str | None = None


class ModelVersion(BaseModel):
    """Which files a replica serves for a model: their content hash, and when the replica loaded them."""

    version: str = Field(description="Content hash of the model directory (sha256 of its files, 12 hex digits).")
    loaded_at: str = Field(description="When the replica loaded it (UTC, ISO 8601).")
    replicas: int | None = Field(None, description="In GET /info's models: live replicas serving this version.")


class ServeStats(BaseModel):
    """Counters of one model replica since it started (they show whether batching merges requests)."""

    replica: str
    node_id: str | None = Field(None, description="The Ray node the replica runs on.")
    pid: int | None = Field(None, description="The replica's process id.")
    models: list[str] = Field(default_factory=list, description="Models loaded on this replica now.")
    versions: dict[str, ModelVersion] = Field(default_factory=dict, description="Each loaded model's version.")
    requests: int = Field(description="Requests scored.")
    pairs: int = Field(description="Pairs scored.")
    batches: int = Field(description="Cross-request batches (@serve.batch calls).")
    max_requests_per_batch: int
    forward_passes: int
    mixed_forward_passes: int = Field(description="Forward passes that held pairs of more than one request.")
    truncated_pairs: int
    peak_rss_mb: float = Field(description="Peak resident memory of the replica process.")
    peak_gpu_mb: float | None = Field(None, description="Peak GPU memory allocated by torch (GPU replicas).")


class ServeTotals(BaseModel):
    """The counters of every live replica, added up."""

    replicas: int
    requests: int
    pairs: int
    batches: int
    max_requests_per_batch: int
    forward_passes: int
    mixed_forward_passes: int
    truncated_pairs: int

    @classmethod
    def of(cls, replicas: list[ServeStats]) -> ServeTotals:
        summed = ("requests", "pairs", "batches", "forward_passes", "mixed_forward_passes", "truncated_pairs")
        return cls(
            replicas=len(replicas),
            max_requests_per_batch=max((r.max_requests_per_batch for r in replicas), default=0),
            **{key: sum(getattr(r, key) for r in replicas) for key in summed},
        )


class ServedModel(BaseModel):
    name: str
    path: str | None = Field(
        None, description="Directory (or URI) the model loads from; shown only when the server has an API key."
    )
    default: bool = Field(description="Requests that name no model get this one.")
    loaded_on: int = Field(description="Live replicas that hold it loaded now.")
    versions: list[ModelVersion] = Field(
        default_factory=list,
        description="The versions live replicas serve (two while an update rolls out), oldest load first.",
    )


class InfoResponse(BaseModel):
    model: str = Field(description="Name of the model described below (the default, or GET /info?model=NAME).")
    model_path: str | None = Field(
        None,
        description="Directory (or hub id) the model was loaded from; shown only when the server has an API key "
        "(then every caller of /info has it), null on a server without one.",
    )
    task: str = Field(description="rerank (1 output: use /rerank) or nli/classification (use /predict).")
    version: ModelVersion | None = Field(None, description="The described model's version on the answering replica.")
    num_labels: int
    labels: list[str] | None = Field(None, description="Class names, index = label id (classifiers).")
    max_length: int = Field(description="Tokens per pair; longer pairs are truncated (and counted in usage).")
    device: str
    precision: str
    backend: str = Field("torch", description="Inference engine: torch, onnx (ONNX Runtime) or openvino (serve.backend).")
    model_file: str | None = Field(None, description="The ONNX/OpenVINO file served (onnx and openvino backends).")
    fusion: dict[str, Any] | None = Field(
        None,
        description="serve.fusion: null when off; else {weight, normalisation, retriever, source} and, for a model "
        "ce-ray fitted (normalisation fixed-scales), its scales and calibration: relevance_score is the sigmoid of "
        "scale x ((1 - weight) x (logit - logit_mean) / logit_std + weight x (cosine - cosine_mean) / cosine_std) + "
        "bias, the same for a document whatever else the request holds; without scales (zscore-per-query), z-scores "
        "over the request's documents.",
    )
    limits: dict[str, Any] = Field(description="max_documents, max_pairs, max_text_chars and the batching settings.")
    models: list[ServedModel] = Field(default_factory=list, description="Every model this app serves.")
    replicas: list[ServeStats] = Field(
        default_factory=list, description="Every live model replica's counters (each at most about 1 s old)."
    )
    totals: ServeTotals | None = Field(None, description="The replicas' counters added up.")


# --------------------------------------------------------------------------------------------
# Text Embeddings Inference's rerank shape, on POST /rerank
# --------------------------------------------------------------------------------------------
class TeiRerankRequest(BaseModel):
    """Hugging Face TEI's ``POST /rerank`` body (told apart from ce-ray's by ``texts``); the answer is TEI's
    list of ``{index, score[, text]}``, best first."""

    model_config = ConfigDict(extra="forbid")

    query: Text
    texts: list[Text] = Field(min_length=1)
    raw_scores: StrictBool = Field(False, description="Logits instead of sigmoid scores.")
    return_text: StrictBool = Field(False)
    truncate: StrictBool = Field(True, description="false: a pair longer than the model's max length is 413.")
    truncation_direction: Literal["Right", "right"] = Field("Right", description="Only Right is supported.")

    def to_rerank(self) -> RerankRequest:
        return RerankRequest(
            query=self.query, documents=self.texts, return_documents=self.return_text, raw_scores=self.raw_scores,
            max_chunks_per_doc=1,  # TEI cuts a long text (truncate: true) or refuses it; it never chunks
        )  # fmt: skip


class TeiRerankResult(BaseModel):
    index: int
    score: float
    text: str | None = None


# --------------------------------------------------------------------------------------------
# Cohere's rerank API (v1 and v2), for its SDK and the tools built on it
# --------------------------------------------------------------------------------------------
# Fields of Cohere's request that change what is computed and ce-ray does not do; refused (422 naming them)
# rather than ignored.
COHERE_UNSUPPORTED = ("relevant_spans",)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field}: {message}", field=field)


def render_document(document: dict[str, Any], rank_fields: list[str]) -> str:
    """An object document as Cohere documents it for ``rank_fields``: the named fields as ``key: value`` lines,
    in ``rank_fields`` order (``{"title": "T", "body": "B"}``, ``["title", "body"]`` → ``"title: T\\nbody: B"``)."""
    return "\n".join(f"{key}: {document[key]}" for key in rank_fields)


class CohereRerankRequest(BaseModel):
    """``POST /v1/rerank`` and ``/v2/rerank``: Cohere's request. Other optional fields (``priority``...) are
    accepted, ignored and named in the ``X-Ignored-Fields`` response header; fields that would change the
    scores and are not done here (:data:`COHERE_UNSUPPORTED`) give 422.

    A document is a text or an object: ``{text, ...}`` (its ``text`` is scored), or, with ``rank_fields``, any
    object holding those fields as strings (scored as :func:`render_document` renders it). Other fields of an
    object are kept, and come back with ``return_documents`` (v1)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = Field(
        None, description="Must name a served model when given (its name in GET /info, or its path)."
    )
    query: Text
    documents: list[Any] = Field(
        min_length=1,
        description="Texts, or objects: {text, ...}, or with rank_fields objects holding those fields as strings.",
        json_schema_extra={"items": {"anyOf": [{"type": "string"}, {"type": "object"}]}},
    )
    top_n: StrictInt | None = Field(None, ge=1)
    return_documents: StrictBool = Field(False, description="v1: include each document (an object as it was sent).")
    max_chunks_per_doc: StrictInt | None = Field(
        None, ge=1, description="v1: most chunks of a long document (its score: the best chunk's), up to the server's."
    )
    max_tokens_per_doc: StrictInt | None = Field(
        None, ge=1, description="v2: each document is cut to this many tokens, then chunked as the server does."
    )
    rank_fields: list[StrictStr] | None = Field(
        None,
        min_length=1,
        description="Fields of object documents to rank on, in this order: each object is scored as its "
        "'key: value' lines (a missing or non-string field is 422). Text documents are scored as they are.",
    )

    def ignored_fields(self) -> list[str]:
        return sorted(set(self.model_extra or {}) - set(COHERE_UNSUPPORTED))

    def unsupported_fields(self) -> list[str]:
        return sorted(k for k, v in (self.model_extra or {}).items() if k in COHERE_UNSUPPORTED and v is not None)

    def texts(self) -> list[str]:
        """The text each document is scored as; :class:`ApiError` (422) naming the document (and field) at fault."""
        fields = self.rank_fields
        if fields is not None:
            for key in fields:
                if not key.strip():
                    raise _invalid("rank_fields", "a field name is empty; name the object fields to rank on")
            if len(set(fields)) < len(fields):
                twice = next(k for k in fields if fields.count(k) > 1)
                raise _invalid("rank_fields", f"{twice[:100]!r} is named twice; name each field once")
        texts = []
        for i, doc in enumerate(self.documents):
            if isinstance(doc, str):
                texts.append(_checked_text(f"documents.{i}", doc, visible=True))
            elif not isinstance(doc, dict):
                raise _invalid(f"documents.{i}", f"must be a text or an object, not {_json_type(doc)}")
            elif fields is None:
                if "text" not in doc:
                    raise _invalid(
                        f"documents.{i}.text",
                        "missing: an object document needs a 'text' field, or name the fields to rank in rank_fields",
                    )
                texts.append(_checked_text(f"documents.{i}.text", doc["text"], visible=True))
            else:
                for key in fields:
                    if key not in doc:
                        raise _invalid(
                            f"documents.{i}.{key}"[:200],
                            f"missing: rank_fields names {key[:100]!r}, so every object document needs it as a string",
                        )
                    _checked_text(f"documents.{i}.{key}"[:200], doc[key], visible=False, hint=" (rank_fields ranks string fields)")
                texts.append(render_document(doc, fields))
        return texts

    def to_rerank(self) -> RerankRequest:
        return RerankRequest(
            model=self.model, query=self.query, documents=self.texts(), top_n=self.top_n,
            return_documents=False,  # the answer carries the documents as they were sent (CohereRerankResponse.of)
            max_chunks_per_doc=self.max_chunks_per_doc, max_tokens_per_doc=self.max_tokens_per_doc,
        )  # fmt: skip


def _checked_text(field: str, value: Any, visible: bool, hint: str = "") -> str:
    """``value`` as a text to score: a string, valid Unicode, and (``visible``) showing something."""
    if not isinstance(value, str):
        raise _invalid(field, f"must be a string{hint}, not {_json_type(value)}")
    try:
        if visible:
            return _visible_text(value)
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _invalid(field, f"not valid Unicode: a lone surrogate at character {exc.start}") from None
    except ValueError as exc:
        raise _invalid(field, str(exc)) from None
    return value


class CohereRerankResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = Field(
        None, description="v1 with return_documents: {text} for a text, an object document as it was sent."
    )


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereRerankResult]
    meta: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(
        cls, response: RerankResponse, version: str, documents: list[Any] | None = None, warnings: list[str] | None = None
    ) -> CohereRerankResponse:
        """Cohere's answer to ``response``; with ``documents`` (the request's), each result carries its document;
        ``warnings`` go to ``meta.warnings`` as Cohere's do."""
        import uuid

        def document(i: int) -> dict[str, Any] | None:
            if documents is None:
                return None
            return {"text": documents[i]} if isinstance(documents[i], str) else documents[i]

        results = [
            CohereRerankResult(index=r.index, relevance_score=r.relevance_score, document=document(r.index))
            for r in response.results
        ]
        meta = {"api_version": {"version": version}, "billed_units": {"search_units": 1}, "tokens": {"input_tokens": response.usage.total_tokens}}
        if warnings:
            meta["warnings"] = warnings
        return cls(id=str(uuid.uuid4()), results=results, meta=meta)


# --------------------------------------------------------------------------------------------
# limits that depend on the server config
# --------------------------------------------------------------------------------------------
def _too_large(field: str, message: str) -> ApiError:
    return ApiError(413, "too_large", f"{field}: {message}", field=field)


def _check_text(field: str, text: str, cfg: ServeConfig) -> None:
    if len(text) > cfg.max_text_chars:
        raise _too_large(field, f"{len(text)} characters, at most {cfg.max_text_chars} (serve.max_text_chars)")


def _check_model(requested: str | None, served: Catalog) -> str:
    name = served.resolve(requested)
    if name is None:
        listed = ", ".join(repr(n) for n in served.names[:20])
        message = f"model: {requested[:100]!r} is not served here; this server serves {listed} (see GET /info)"
        raise ApiError(404, "model_not_found", message, field="model")
    return name


def check_rerank(request: RerankRequest, cfg: ServeConfig, served: Catalog) -> str:
    """The name of the model ``request`` asks for; :class:`ApiError` (413/404) when it is over the limits or
    names a model this app does not serve."""
    name = _check_model(request.model, served)
    if len(request.documents) > cfg.max_documents:
        raise _too_large(
            "documents", f"{len(request.documents)} documents, at most {cfg.max_documents} (serve.max_documents)"
        )
    _check_text("query", request.query, cfg)
    for i, doc in enumerate(request.documents):
        _check_text(f"documents.{i}", doc, cfg)
    return name


def chunks_per_doc(request: RerankRequest, cfg: ServeConfig) -> tuple[int, str | None]:
    """The windows a long document of ``request`` may be split into, and a warning when the request asked for more
    than the server allows (``serve.max_chunks_per_doc``; honoured up to it, not refused)."""
    default = cfg.max_chunks_per_doc if cfg.long_documents == "chunk" else 1
    asked = request.max_chunks_per_doc
    if asked is None:
        return default, None
    if asked > cfg.max_chunks_per_doc:
        return cfg.max_chunks_per_doc, (
            f"max_chunks_per_doc: {asked} is above this server's limit; used {cfg.max_chunks_per_doc} "
            "(serve.max_chunks_per_doc)"
        )
    return asked, None


def check_predict(request: PredictRequest, cfg: ServeConfig, served: Catalog) -> str:
    """The name of the model ``request`` asks for; :class:`ApiError` (413/404) as :func:`check_rerank`."""
    name = _check_model(request.model, served)
    if len(request.pairs) > cfg.max_pairs:
        raise _too_large("pairs", f"{len(request.pairs)} pairs, at most {cfg.max_pairs} (serve.max_pairs)")
    for i, pair in enumerate(request.pairs):
        for j, text in enumerate(pair):
            _check_text(f"pairs.{i}.{j}", text, cfg)
    return name


def coerce(model_cls, value):
    """A request model from a request model or a dict (handle callers may pass either)."""
    if isinstance(value, model_cls):
        return value
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = field_name(first["loc"])
        raise ApiError(422, "invalid_request", f"{field}: {first['msg']}", field=field) from None
