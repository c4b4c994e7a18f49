"""The `remote` engine: decal on vLLM's OpenAI-compatible servers, with no weights in this process.

`--engine remote --server-url http://HOST:PORT/v1` (repeatable: one URL per replica, or one URL
for a load balancer) sends the requests of the in-process vllm engine
(`decal.engines.vllm.VLLMRequestEngine`) to vLLM 0.32's `/v1/completions`: prompts as token ids
that decal rendered and tokenized itself, `logprob_token_ids` for the options' decision tokens
(full-vocabulary log-probabilities, before temperature), `return_token_ids` so the generated ids
come back as ids and are never re-tokenized, every sampling parameter set explicitly (so the
server's generation-config defaults never apply), and a seed per sampled prompt. The records
equal those of `--engine vllm` on the same weights and dtype, up to floating-point rounding
(docs/design.md, "Remote engine").

Exactness checks, before any example is scored (`connect`); each failure is one line naming what
differs, and the server is refused:

- the served model: `/v1/models` names one base model (or `--served-model-name` picks one), which
  must be `--model`: the same hub id, or the same folder (the same path when it exists here, else
  the same folder name); its `max_model_len` must not exceed the model's own context;
- adapters: each `--adapter` is a LoRA module the server was started with (`--lora-modules
  NAME=DIR`), named by its name or its folder;
- the tokenizer: `/tokenize` on probe texts and on a chat prompt rendered here gives the local
  tokenizer's ids;
- `logprob_token_ids` is honoured (a server that ignores it returns its top-k instead) and ids
  come back as ids;
- the log-probabilities are raw: the same at temperature 2 as greedy (a server started with
  `--logprobs-mode processed_*` applies temperature and penalties), and normalised (top-5
  probabilities sum to at most 1: not logits);
- `max_model_len` bounds the prompt-length check (`EngineSpec.context_length`), so a prompt plus
  its completion that does not fit fails before the run starts.

Scale-out and faults (`Fleet`): requests go to the replica with the fewest in flight, at most
`max_concurrency` per replica; every request has a timeout and is retried with exponential
backoff on connection errors, 5xx and 429 (honouring Retry-After), on another replica when one
is up; a replica that fails is left alone for the backoff. When every replica keeps failing, the
call raises `RemoteEngineError` (one line); the evaluation's records written so far stay, and a
rerun resumes.

Credentials: `api_key` (`--api-key`, else $DECAL_SERVER_API_KEY) is sent as a bearer token and
kept out of `info()`, reprs, logs and error messages; a URL with credentials in it is refused.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from ..decision import stop_token_ids
from ..errors import ConfigError, DecalError
from .base import EngineOptions
from .registry import Capabilities, EngineKind, EngineOption
from .vllm import CALL_SIZE, VLLMCompletion, VLLMRequest, VLLMRequestEngine, _generation_config_holder

__all__ = [
    "API_KEY_ENV",
    "KIND",
    "Fleet",
    "RemoteEngine",
    "RemoteEngineError",
    "RemoteOptions",
    "ServedModel",
    "connect",
    "logprob_refusal",
]

logger = logging.getLogger(__name__)

API_KEY_ENV = "DECAL_SERVER_API_KEY"
# Prompts of one HTTP request, when their requests differ only in the prompt (scoring, greedy
# generation): fewer round trips, and the server still schedules each prompt on its own.
PROMPTS_PER_REQUEST = 16
_BACKOFF_S, _BACKOFF_MAX_S = 0.5, 10.0
# Probe texts for the tokenizer check: ASCII, digits, whitespace runs, non-Latin scripts, emoji
# and chat-template markup, where tokenizers of one family most often differ.
_PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces,\ttabs\nand\n\nnewlines; 1234567890 3.14159 -42",
    "Safe Unsafe unsafe SAFE A B C D E (A) [B] {C}",
    "Grüße, naïve café — 東京 🤖 مرحبا Привет",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
)


class RemoteEngineError(DecalError, RuntimeError):
    """A server cannot be used (an exactness check failed) or stopped answering; one line, never the API key."""


@dataclass(frozen=True, kw_only=True)
class RemoteOptions:
    """The remote engine's options (`EngineOptions.extra` keys, `engine_options` in configs).

    server_urls: base URLs of OpenAI-compatible APIs, one per replica (or one load balancer),
        each ending in /v1.
    served_model_name: the model name at the servers (default: the one base model they list).
    max_concurrency: requests in flight per replica at most.
    server_timeout: seconds one request may take (connecting, queueing on the server, generating).
    server_retries: retries of a request after a connection error, 5xx or 429, before the call fails.
    """

    server_urls: tuple[str, ...]
    served_model_name: str | None = None
    max_concurrency: int = 64
    server_timeout: float = 600.0
    server_retries: int = 6

    def __post_init__(self) -> None:
        if not self.server_urls:
            raise ConfigError("--engine remote needs --server-url (the base of an OpenAI-compatible API, "
                              "e.g. http://127.0.0.1:8000/v1)")
        for url in self.server_urls:
            _check_url(url)
        if len(set(self.server_urls)) != len(self.server_urls):
            raise ConfigError("--server-url lists a URL twice; give each replica once")
        for name, value, low in (("max_concurrency", self.max_concurrency, 1), ("server_retries", self.server_retries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"`{name}` must be an integer >= {low}; got {value!r}")
        t = self.server_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"`server_timeout` must be a number of seconds > 0; got {t!r}")

    @classmethod
    def from_options(cls, options: EngineOptions) -> "RemoteOptions":
        extra = dict(options.extra)
        urls = extra.pop("server_urls", ())
        urls = (urls,) if isinstance(urls, str) else tuple(str(u) for u in urls or ())
        try:
            return cls(server_urls=tuple(u.rstrip("/") for u in urls), **extra)
        except TypeError as e:  # an unknown key (the registry names them first; this guards direct use)
            raise ConfigError(f"remote engine options: {e}") from e


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--server-url {url!r} is not an http(s) URL; give the API base, e.g. http://127.0.0.1:8000/v1")
    if parts.username or parts.password:
        raise ConfigError(f"--server-url for {parts.hostname} has credentials in it; pass them with --api-key or "
                          f"${API_KEY_ENV} (a URL is recorded in run.json, a key never is)")
    if not parts.path.rstrip("/").endswith("/v1"):
        raise ConfigError(f"--server-url {url!r} must be the base of the OpenAI API, ending in /v1 "
                          f"(e.g. {parts.scheme}://{parts.netloc}/v1)")


def _check_options(options: EngineOptions, *, context: int | None = None, devices: bool = True) -> None:
    RemoteOptions.from_options(options)


# -- HTTP: replicas, concurrency, retries ---------------------------------------------------------


@dataclass(eq=False)
class _Replica:
    url: str  # the API base, .../v1
    order: int
    inflight: int = 0
    sent: int = 0
    failures: int = 0  # consecutive
    down_until: float = 0.0
    last_error: str = ""

    @property
    def root(self) -> str:
        """The server's root (where vLLM serves /tokenize and /version)."""
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url


def _retry_after(response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _server_message(response) -> str:
    """The error message of an OpenAI-style error body (or the start of the body), on one line."""
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        text = str(error.get("message", error) if isinstance(error, dict) else error)
    except ValueError:
        text = response.text
    return " ".join(text.split())[:300]


class Fleet:
    """The servers one remote engine talks to: an httpx client on a background event loop.

    `post`/`get` send one request and `post_many` many at once (blocking; the calling thread
    waits), each to the replica with the fewest in flight (at most `max_concurrency`), retried as
    the module docstring says. `pin` sends to one replica only (the exactness checks).
    """

    def __init__(self, options: RemoteOptions, *, api_key: str | None = None):
        import httpx

        self.options = options
        self.replicas = [_Replica(url=u, order=i) for i, u in enumerate(options.server_urls)]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        slots = len(self.replicas) * options.max_concurrency
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="decal-remote-http", daemon=True)
        self._thread.start()

        async def make():
            return httpx.AsyncClient(
                headers=headers, timeout=httpx.Timeout(options.server_timeout, connect=min(10.0, options.server_timeout)),
                limits=httpx.Limits(max_connections=slots + 8, max_keepalive_connections=slots + 8),
            ), asyncio.Condition()

        self._client, self._cond = self._submit(make())
        self.closed = False

    def _submit(self, coro):
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    # -- replica choice ---------------------------------------------------------------------

    async def _acquire(self, pin: _Replica | None) -> _Replica:
        async with self._cond:
            while True:
                now = self._loop.time()
                pool = [pin] if pin is not None else self.replicas
                up = [r for r in pool if r.down_until <= now]
                free = [r for r in up if r.inflight < self.options.max_concurrency]
                if free:
                    replica = min(free, key=lambda r: (r.inflight, r.sent, r.order))
                    replica.inflight += 1
                    replica.sent += 1
                    return replica
                wait = None if up else max(0.0, min(r.down_until for r in pool) - now)
                try:
                    await asyncio.wait_for(self._cond.wait(), wait)
                except asyncio.TimeoutError:
                    pass

    async def _release(self, replica: _Replica, error: str | None, retry_after: float | None) -> None:
        async with self._cond:
            replica.inflight -= 1
            if error is None:
                replica.failures, replica.down_until = 0, 0.0
            else:
                if replica.failures == 0 and len(self.replicas) > 1:
                    # Once per server and command (the CLI's "once" filter): the user should know
                    # that the fleet is smaller now, though the run goes on.
                    warnings.warn(f"server {replica.url} stopped answering ({error.split(':')[0]}); its requests go "
                                  "to the other servers, and it is tried again after a backoff", stacklevel=2)
                replica.failures += 1
                replica.last_error = error
                backoff = min(_BACKOFF_MAX_S, _BACKOFF_S * 2 ** (replica.failures - 1))
                pause = retry_after if retry_after is not None else backoff * (0.75 + 0.5 * random.random())
                replica.down_until = max(replica.down_until, self._loop.time() + pause)
            self._cond.notify_all()

    # -- one request ------------------------------------------------------------------------

    async def _send(self, method: str, path: str, body: dict | None, *, pin: _Replica | None = None,
                    root: bool = False) -> dict:
        import httpx

        attempts = 0
        while True:
            replica = await self._acquire(pin)
            url = (replica.root if root else replica.url) + path
            error = retry_after = response = None
            try:
                response = await self._client.request(method, url, json=body)
                if response.status_code == 429 or response.status_code >= 500:
                    error, retry_after = f"HTTP {response.status_code}: {_server_message(response)}", _retry_after(response)
            except httpx.TransportError as e:
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            finally:  # also when the call is cancelled: the slot is given back
                await self._release(replica, error, retry_after)
            if error is None:
                if response.status_code >= 400:  # not retried: the request itself is refused
                    raise RemoteEngineError(f"{url}: HTTP {response.status_code}: {_server_message(response)}"
                                            + _status_hint(response.status_code))
                try:
                    return response.json()
                except ValueError as e:
                    raise RemoteEngineError(f"{url}: the server's answer is not JSON ({e})") from e
            pool = [pin] if pin is not None else self.replicas
            # An attempt counts towards giving up only while no replica is healthy: a request that
            # waits behind a live replica's slots must not run out of attempts on a dead one.
            if not any(r.failures == 0 for r in pool):
                attempts += 1
            logger.info("%s: %s (%d of %d attempts with every server failing)", url, error, attempts,
                        self.options.server_retries + 1)
            if attempts > self.options.server_retries:
                raise RemoteEngineError(self._give_up(pool, attempts))

    @staticmethod
    def _give_up(pool: list[_Replica], attempts: int) -> str:
        failed = "; ".join(f"{r.url}: {r.last_error}" for r in pool if r.last_error)
        who = "the server" if len(pool) == 1 else f"every one of the {len(pool)} servers"
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        return (f"{who} failed after {tries} ({failed}); start the server(s) again and rerun the same command "
                "to resume")

    # -- blocking API -----------------------------------------------------------------------

    def get(self, path: str, *, pin: _Replica | None = None, root: bool = False) -> dict:
        return self._submit(self._send("GET", path, None, pin=pin, root=root))

    def post(self, path: str, body: dict, *, pin: _Replica | None = None, root: bool = False) -> dict:
        return self._submit(self._send("POST", path, body, pin=pin, root=root))

    def post_many(self, path: str, bodies: Sequence[dict]) -> list[dict]:
        """POST every body at once; the answers in order. The first request that fails for good
        cancels the others and raises."""

        async def run():
            tasks = [asyncio.ensure_future(self._send("POST", path, b)) for b in bodies]
            try:
                return await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()

        return self._submit(run())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._submit(self._client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


def _status_hint(status: int) -> str:
    if status == 401:
        return f" (the server wants an API key: pass --api-key or set ${API_KEY_ENV})"
    if status == 404:
        return " (is this a vLLM OpenAI-compatible server, and the URL its base ending in /v1?)"
    return ""


# -- the exactness checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    """What the servers serve, as `/v1/models` lists it: the base model, its context, LoRA modules."""

    name: str
    root: str
    max_model_len: int | None
    loras: dict[str, str] = field(default_factory=dict)  # module name -> its folder
    version: str | None = None


def _models(fleet: Fleet, replica: _Replica, wanted: str | None) -> ServedModel:
    cards = fleet.get("/models", pin=replica).get("data") or []
    bases = [c for c in cards if not c.get("parent")]
    if wanted is not None:
        base = next((c for c in bases if c.get("id") == wanted), None)
        if base is None:
            names = ", ".join(str(c.get("id")) for c in bases) or "none"
            raise RemoteEngineError(f"{replica.url} does not serve --served-model-name {wanted!r}; it serves {names}")
    elif len(bases) != 1:
        names = ", ".join(str(c.get("id")) for c in bases) or "none"
        raise RemoteEngineError(f"{replica.url} serves {len(bases)} base models ({names}); pick one with --served-model-name")
    else:
        base = bases[0]
    loras = {str(c["id"]): str(c.get("root") or "") for c in cards if c.get("parent") == base.get("id")}
    try:
        version = fleet.get("/version", pin=replica, root=True).get("version")
    except RemoteEngineError:
        version = None
    limit = base.get("max_model_len")
    return ServedModel(name=str(base["id"]), root=str(base.get("root") or base["id"]),
                       max_model_len=int(limit) if isinstance(limit, int) else None, loras=loras,
                       version=None if version is None else str(version))


def _same_model(model: str, source: str, served: ServedModel) -> bool:
    """Whether the served model is `--model` (its local `source` folder, or a hub id)."""
    names = {served.root, served.name}
    if str(model) in names or str(source) in names:
        return True
    if not Path(str(model)).exists() and any(n.rstrip("/").endswith("/" + str(model)) for n in names):
        return True  # a hub id, served from a folder of that name (e.g. /models/Qwen/Qwen3-8B)
    local = Path(source)
    for name in names:
        there = Path(name)
        if there.exists() and local.exists():
            if there.resolve() == local.resolve():
                return True
        elif there.is_absolute() and local.exists() and there.name == local.resolve().name:
            return True  # the same folder name on the server's machine
    return False


def _adapter_module(adapter: str, served: ServedModel, url: str) -> str:
    """The name of the server's LoRA module for `adapter` (a module name, or the folder it was loaded from)."""
    if adapter in served.loras:
        return adapter
    for name, root in served.loras.items():
        if root and (root == adapter or (Path(adapter).exists() and Path(root).exists()
                                         and Path(root).resolve() == Path(adapter).resolve())):
            return name
    have = ", ".join(f"{n}={r}" for n, r in served.loras.items()) or "none (start vLLM with --enable-lora --lora-modules NAME=DIR)"
    raise RemoteEngineError(f"{url} serves no LoRA module {adapter!r} for {served.name}; its modules: {have}")


def _check_tokenizer(fleet: Fleet, replica: _Replica, served: ServedModel, tokenizer, chat_prompt: str) -> None:
    for text in (*_PROBES, chat_prompt):
        local = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        answer = fleet.post("/tokenize", {"model": served.name, "prompt": text, "add_special_tokens": False},
                            pin=replica, root=True)
        theirs = [int(t) for t in answer.get("tokens") or []]
        if theirs != local:
            at = next((i for i, (a, b) in enumerate(zip(local, theirs)) if a != b), min(len(local), len(theirs)))
            what = "the chat prompt rendered here" if text == chat_prompt else f"probe text {text[:40]!r}"
            raise RemoteEngineError(
                f"{replica.url} serves {served.name} with another tokenizer than --model's: {what} gives {len(theirs)} "
                f"tokens there and {len(local)} here, first differing at token {at} "
                f"({theirs[at:at + 1] or 'end'} there, {local[at:at + 1] or 'end'} here)"
            )


def _probe_body(served: ServedModel, prompt: list[int], ids: list[int], **overrides) -> dict:
    return {**_sampling_body(served.name, VLLMRequest(prompt=prompt, n=1, temperature=0.0, max_tokens=1,
                                                      logprob_token_ids=ids, stop_token_ids=[])), **overrides}


def _probe_answers(fleet: Fleet, replica: _Replica, served: ServedModel, prompt: list[int], ids: list[int]) -> dict:
    """The three probe requests of the log-probability checks (see `logprob_refusal`)."""
    top = _probe_body(served, prompt, [])
    top.pop("logprob_token_ids")
    top["logprobs"] = 5
    return {
        "greedy": fleet.post("/completions", _probe_body(served, prompt, ids), pin=replica),
        "hot": fleet.post("/completions", _probe_body(served, prompt, ids, temperature=2.0, seed=0), pin=replica),
        "top": fleet.post("/completions", top, pin=replica),
    }


def logprob_refusal(answers: dict, ids: Sequence[int]) -> str | None:
    """Why a server's probe answers show it cannot give exact option probabilities, or None.

    `answers` holds the `/v1/completions` answers of one prompt, max_tokens 1: "greedy" with
    `logprob_token_ids=ids`, "hot" the same at temperature 2, "top" greedy with `logprobs=5` and no
    ids. The server must return the generated ids and log-probabilities keyed by id, honour
    `logprob_token_ids` (a server that ignores it returns its top-k), return raw log-probabilities
    (the same at temperature 2 as greedy; `--logprobs-mode processed_*` applies temperature and
    penalties) and normalised ones (top-5 probabilities sum to at most 1; not logits).
    """
    try:
        (choice,) = answers["greedy"]["choices"]
        position = _positions(choice)[0]
        if choice.get("token_ids") is None:
            raise KeyError("token_ids")
        hot = _positions(answers["hot"]["choices"][0])[0]
        top = _positions(answers["top"]["choices"][0])[0]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return (f"it does not return generated token ids with log-probabilities keyed by id ({type(e).__name__}: {e}); "
                "decal needs vLLM >= 0.32's /v1/completions")
    missing = [t for t in ids if t not in position]
    if missing:
        return (f"it ignores logprob_token_ids (no log-probability for token ids {missing}; it returned its top-k "
                "instead), so it cannot give full-vocabulary option probabilities: use vLLM >= 0.32's OpenAI server")
    # The same position of the same prompt: raw log-probabilities agree to float32 rounding.
    if any(t not in hot or abs(hot[t] - position[t]) > 1e-3 for t in ids):
        return (f"it returns processed log-probabilities (those of token ids {list(ids)} change with the temperature: "
                f"{[round(position[t], 4) for t in ids]} greedy, {[round(hot.get(t, math.nan), 4) for t in ids]} at 2.0); "
                "start vLLM with --logprobs-mode raw_logprobs (the default)")
    mass = sum(math.exp(min(v, 50.0)) for v in top.values())
    if mass > 1.0 + 1e-3:
        return (f"it returns values that are not log-probabilities (its top tokens' probabilities sum to {mass:.3g}); "
                "start vLLM with --logprobs-mode raw_logprobs (the default)")
    return None


def connect(spec, model_config=None) -> "_Connection":
    """Run the exactness checks on every replica (see the module docstring); the checked connection.

    Raises:
        RemoteEngineError: a check failed or a server does not answer (one line).
    """
    from ..models import resolve_model
    from ..tasks.prompts import render_chat

    options = RemoteOptions.from_options(spec.options)
    fleet = Fleet(options, api_key=spec.api_key or os.environ.get(API_KEY_ENV) or None)
    try:
        source = resolve_model(spec.model, offline=spec.offline)
        chat_prompt = render_chat(spec.tokenizer, "Is this request safe? Answer Safe or Unsafe.", reasoning=False)
        prompt = list(spec.tokenizer(chat_prompt, add_special_tokens=False)["input_ids"])
        probe_ids = sorted({prompt[-1], prompt[len(prompt) // 2]})
        seen: ServedModel | None = None
        for replica in fleet.replicas:
            served = _models(fleet, replica, options.served_model_name)
            if seen is not None and (served.name, served.loras) != (seen.name, seen.loras):
                raise RemoteEngineError(f"{replica.url} serves {served.name} with LoRA modules {sorted(served.loras)}, "
                                        f"but {fleet.replicas[0].url} serves {seen.name} with {sorted(seen.loras)}")
            _check_tokenizer(fleet, replica, served, spec.tokenizer, chat_prompt)
            _check_served(spec, source, served, replica.url)
            refusal = logprob_refusal(_probe_answers(fleet, replica, served, prompt, probe_ids), probe_ids)
            if refusal:
                raise RemoteEngineError(f"{replica.url} cannot be used: {refusal}")
            seen = served
        adapters = {a: _adapter_module(a, seen, fleet.replicas[0].url) for a in (spec.adapter, *spec.adapters) if a}
    except BaseException:
        fleet.close()
        raise
    logger.info("checked %d server(s) for %s: %s, max_model_len %s", len(fleet.replicas), spec.model, seen.name,
                seen.max_model_len)
    return _Connection(fleet=fleet, served=seen, adapters=adapters, source=source)


def _check_served(spec, source: str, served: ServedModel, url: str) -> None:
    if not _same_model(spec.model, source, served):
        raise RemoteEngineError(
            f"{url} serves {served.name} (from {served.root}), not --model {spec.model}; point --server-url at a "
            "server of that model, or pass the model it serves as --model"
        )
    if served.max_model_len and spec.model_context and served.max_model_len > spec.model_context:
        raise RemoteEngineError(
            f"{url} serves {served.name} with max_model_len {served.max_model_len}, above the context of --model "
            f"{spec.model} ({spec.model_context} tokens): it serves another model"
        )


@dataclass(eq=False)
class _Connection:
    """The checked fleet of a remote engine, shared by its adapter views."""

    fleet: Fleet
    served: ServedModel
    adapters: dict[str, str]  # --adapter -> LoRA module name
    source: str
    owned: bool = False  # an engine was built on it (and closes it)

    def release(self) -> None:
        """Close the connection when no engine was built on it."""
        if not self.owned:
            self.fleet.close()


# -- the engine -----------------------------------------------------------------------------------


def _sampling_body(model: str, r: VLLMRequest) -> dict:
    """The `/v1/completions` body of a request: every sampling parameter explicit (the server's
    generation-config defaults must not apply), full-vocabulary sampling, ids in and out."""
    return {
        "model": model, "prompt": list(r.prompt), "n": r.n, "max_tokens": r.max_tokens, "temperature": r.temperature,
        "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "seed": r.seed, "stop_token_ids": list(r.stop_token_ids), "ignore_eos": False,
        "skip_special_tokens": False, "logprobs": len(r.logprob_token_ids), "logprob_token_ids": list(r.logprob_token_ids),
        "return_tokens_as_token_ids": True, "return_token_ids": True, "echo": False, "stream": False,
    }


def _positions(choice: dict) -> list[dict[int, float]]:
    """Per generated position, token id -> log-probability, from a choice's `logprobs.top_logprobs`."""
    out = []
    for position in choice["logprobs"]["top_logprobs"]:
        entry = {}
        for key, value in (position or {}).items():
            prefix, _, number = str(key).partition(":")
            if prefix != "token_id" or not number.isdigit():
                raise ValueError(f"log-probabilities keyed by text ({key!r}), not by token id")
            entry[int(number)] = float(value)
        out.append(entry)
    return out


def _completions(answer: dict, n_prompts: int, n: int) -> list[list[VLLMCompletion]]:
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    if len(choices) != n_prompts * n:
        raise RemoteEngineError(f"the server returned {len(choices)} completions for {n_prompts} prompts x {n} samples")
    out: list[list[VLLMCompletion]] = [[] for _ in range(n_prompts)]
    for k, choice in enumerate(choices):
        ids = [int(t) for t in choice["token_ids"]]
        positions = _positions(choice)
        if len(positions) != len(ids):
            raise RemoteEngineError(f"the server returned {len(positions)} log-probability positions for {len(ids)} tokens")
        out[k // n].append(VLLMCompletion(index=k % n, token_ids=ids, logprobs=positions))
    return out


class RemoteEngine(VLLMRequestEngine):
    """vLLM's OpenAI-compatible servers as a decal engine (see the module docstring).

    Build it with `decal.engines.prepare_engine("remote", model, options=EngineOptions(extra=
    {"server_urls": [...]})).build()`; `with_adapter` gives views on the same servers.
    """

    name = "remote"

    def __init__(self, connection: _Connection, tokenizer, *, model_name: str, adapter: str | None,
                 owner: bool = True):
        self._connection = connection
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.adapter = None if adapter is None else str(adapter)
        self.dtype = "server"
        self._owner = owner
        served = connection.served
        self._model = served.name if adapter is None else connection.adapters.get(str(adapter)) or \
            _adapter_module(str(adapter), served, connection.fleet.replicas[0].url)
        fallbacks: list[str] = []
        self.stop_ids = stop_token_ids(tokenizer, _generation_config_holder(connection.source, fallbacks))
        self.fallbacks = tuple(fallbacks)

    @property
    def fleet(self) -> Fleet:
        if self._connection.fleet.closed:
            raise RuntimeError("this remote engine is closed")
        return self._connection.fleet

    def context_length(self) -> int | None:
        return self._connection.served.max_model_len

    def _limit_name(self) -> str:
        return "the server's max_model_len"

    def call_size(self, batch_size: int) -> int:
        """Enough prompts to keep every replica's request slots full, at most vLLM's `CALL_SIZE`, so
        records (and resumable progress) come back regularly."""
        o = self.fleet.options
        return max(int(batch_size), min(CALL_SIZE, len(o.server_urls) * o.max_concurrency * PROMPTS_PER_REQUEST))

    def info(self) -> dict[str, Any]:
        """`engine_options` hold what changes records (the served model and LoRA module);
        `engine_servers` where and how they were asked, recorded but not compared on resume, so a
        rerun on other replicas resumes. Never the API key."""
        o = self.fleet.options
        served = self._connection.served
        options = {"served_model_name": served.name, **({"lora_module": self._model} if self.adapter else {})}
        servers = {"server_urls": list(o.server_urls), "max_model_len": served.max_model_len,
                   "max_concurrency": o.max_concurrency, "server_timeout": o.server_timeout,
                   "server_retries": o.server_retries}
        version = f"vllm {served.version} (server)" if served.version else "unknown (server)"
        return {"engine": "remote", "engine_version": version, "engine_options": options, "engine_servers": servers}

    def with_adapter(self, adapter: str | None) -> "RemoteEngine":
        if (None if adapter is None else str(adapter)) == self.adapter:
            return self
        return RemoteEngine(self._connection, self.tokenizer, model_name=self.model_name, adapter=adapter, owner=False)

    def close(self) -> None:
        if self._owner:
            self._connection.fleet.close()

    def _run(self, requests: list[VLLMRequest]) -> list[list[VLLMCompletion]]:
        # Requests that differ only in their prompt go together, PROMPTS_PER_REQUEST at a time.
        groups: list[list[int]] = []
        for i, r in enumerate(requests):
            last = groups[-1] if groups else None
            if last and len(last) < PROMPTS_PER_REQUEST and _same_params(requests[last[0]], r):
                last.append(i)
            else:
                groups.append([i])
        bodies = []
        for group in groups:
            body = _sampling_body(self._model, requests[group[0]])
            body["prompt"] = [list(requests[i].prompt) for i in group]
            bodies.append(body)
        answers = self.fleet.post_many("/completions", bodies)
        out: list[list[VLLMCompletion]] = [[] for _ in requests]
        for group, answer in zip(groups, answers):
            for i, completions in zip(group, _completions(answer, len(group), requests[group[0]].n)):
                out[i] = completions
        return out


def _same_params(a: VLLMRequest, b: VLLMRequest) -> bool:
    return (a.n, a.temperature, a.max_tokens, a.logprob_token_ids, a.stop_token_ids, a.seed) == \
        (b.n, b.temperature, b.max_tokens, b.logprob_token_ids, b.stop_token_ids, b.seed)


def _prepare(spec, model_config):
    """The remote engine's preparation: connect, run the exactness checks, take the server's context."""
    import dataclasses

    connection = connect(spec, model_config)
    return dataclasses.replace(spec, prepared=connection, model_context=connection.served.max_model_len,
                               context_name="the server's max_model_len")


def _build(spec) -> RemoteEngine:
    connection = spec.prepared
    if connection is None or connection.owned or connection.fleet.closed:
        connection = connect(spec)  # a second engine from one spec gets its own connection
    connection.owned = True
    return RemoteEngine(connection, spec.tokenizer, model_name=spec.model, adapter=spec.adapter)


KIND = EngineKind(
    name="remote",
    summary="vLLM OpenAI-compatible servers at --server-url (one per replica, or a load balancer); no weights here",
    capabilities=Capabilities(per_request_seeds=True, shared_adapters=True, continuous_batching=True,
                              loads_weights=False),
    options=(
        EngineOption("server_urls", "--server-url", repeated=True),
        EngineOption("served_model_name", "--served-model-name"),
        EngineOption("max_concurrency", "--max-concurrency"),
        EngineOption("server_timeout", "--server-timeout"),
        EngineOption("server_retries", "--server-retries"),
    ),
    check_options=_check_options,
    prepare=_prepare,
    build=_build,
)
