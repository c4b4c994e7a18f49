"""Run `decal serve`: check the settings, bind the socket, serve with one uvicorn worker, stop cleanly.

`build_state` does everything cheap before the socket is bound, so a bad task, calibrator,
threshold, model name, label set, reference run or state dir fails with one line and no server:
it loads the task, the calibrator and threshold files, the tokenizer, finds the decision tokens
of one prompt, reads the reference run and opens (and locks) the decision log. The weights load
after the server starts listening, on a thread: GET /health answers at once and GET /ready
turns 200 once the model is loaded, one warm-up decision is made and the monitor is rebuilt
from the log.

One process is one uvicorn worker with one model. Without `--state-dir` the server keeps no
state between requests, so scaling out is N such processes behind a load balancer (README);
with it, each replica keeps its own log (a shared store would replace `decal.serve.store`).

Shutdown (SIGTERM or Ctrl+C): uvicorn stops accepting connections, answers every request it has
accepted (the batching queue keeps running until the last one is answered), then the process
exits 0. uvicorn re-raises the signal after a graceful shutdown; a no-op handler absorbs it so
the exit status is 0, not -15.
"""

from __future__ import annotations

import logging
import signal
import socket

from .app import ServerState, create_app
from .settings import ServeConfig, check_bind, load_served_calibrator

__all__ = ["build_state", "bind_socket", "serve"]

logger = logging.getLogger(__name__)


def _load_task(config: ServeConfig):
    from ..tasks import default_split, load_task

    # Labels and template are the same in every split; the split only has to exist.
    split = config.split or default_split(config.task)
    task = load_task(config.task, split, data_dir=config.data_dir, reasoning=config.reasoning)
    if len(task) == 0:
        raise ValueError(f"task {config.task!r} split {split!r} has no examples; the server needs one to read the labels")
    return task


def _check_decision_tokens(config: ServeConfig, task, tokenizer) -> None:
    """Prepare one prompt as a request's would be: a label collision, or a decision token that
    would not be read where it sits, fails before the server starts."""
    from ..errors import DecisionTokenCollisionError
    from ..recording import prepare_prompts

    try:
        prepare_prompts(tokenizer, task, task.examples[:1])
    except DecisionTokenCollisionError as e:
        raise DecisionTokenCollisionError(f"{config.task}: field 'labels': {e}") from e


def build_state(config: ServeConfig) -> ServerState:
    """Check and load everything but the weights; the returned state loads them when the server starts."""
    from .. import __version__
    from .decider import Decider
    from .decision_log import DecisionLog, epoch_settings
    from .engine import build_serving_engine, prepare_serving_engine
    from .moderation import unsafe_label_of
    from .policy import load_policy

    task = _load_task(config)
    calibrator = load_served_calibrator(config.calibrator) if config.calibrator else None
    policy, policy_info = load_policy(threshold=config.threshold, conformal=config.conformal,
                                      min_label_mass=config.min_label_mass, labels=task.labels, calibrated=calibrator is not None)
    threshold = policy.threshold
    unsafe_label = unsafe_label_of(task.labels, config.unsafe_label)
    spec = prepare_serving_engine(config)  # engine, options, model, adapter, tokenizer: no weights yet
    _check_decision_tokens(config, task, spec.tokenizer)
    reference = _reference(config, task, threshold, calibrator)
    info = {
        "model": config.model, "adapter": config.adapter, "engine": config.engine, "dtype": spec.dtype,
        "dtype_reason": spec.dtype_reason,
        "task": config.task, "labels": list(task.labels), "mode": "reasoning" if task.reasoning else "non-reasoning",
        "prompt_version": task.template.version, "max_new_tokens": config.max_new_tokens if task.reasoning else None,
        "calibrator": calibrator.to_dict() if calibrator else None, **policy_info, "decal_version": __version__,
    }

    def loader() -> Decider:
        engine = build_serving_engine(spec, task, prefix_cache=config.prefix_cache, threads=config.threads)
        decider = Decider(task, engine, model_name=config.model, adapter=config.adapter, calibrator=calibrator,
                          policy=policy, max_new_tokens=config.max_new_tokens)
        decider.decide(decider.prepare(task.examples[:1]))  # warm-up: the first request pays no lazy setup
        return decider

    def settings(cal, thr) -> dict:
        window = reference.window(cal.calibrator if cal else None) if reference is not None else None
        return epoch_settings(model=config.model, adapter=config.adapter, calibrator=cal, threshold=thr, reference=window,
                              alarm_alpha=config.alarm_alpha, monitor_window=config.monitor_window, task=config.task)

    log = DecisionLog.open(config.state_dir, log_bodies=config.log_bodies) if config.state_dir else None
    state = ServerState(config, loader=loader, info=info, unsafe_label=unsafe_label, log=log, epoch_settings=settings)
    state.info["inputs"] = _input_help(task)
    state.info["reference"] = None if reference is None else {"source": reference.source, "n": len(reference.records)}
    return state


def _reference(config: ServeConfig, task, threshold, calibrator):
    """The monitor's reference window: `--reference`, else the threshold file's calibration run if it exists.

    Raises:
        DataError: a malformed run, or one whose labels are not the task's.
        FileNotFoundError: `--reference` names no run.
    """
    from pathlib import Path

    from ..errors import DataError
    from .monitor import ReferenceRun

    if config.state_dir is None:
        return None
    source = config.reference
    if source is None and threshold is not None and threshold.calibration_run and Path(threshold.calibration_run).exists():
        source = threshold.calibration_run
    if source is None:
        return None
    reference = ReferenceRun.read(source)
    labels = list(reference.records[0].labels)
    if labels != list(task.labels):
        raise DataError(f"the reference run's labels {labels} are not the task's {list(task.labels)}", path=source, field="labels")
    reference.window(calibrator.calibrator if calibrator else None)  # the served calibrator must apply to it
    return reference


def _input_help(task) -> dict:
    from .decider import template_fields

    text = task.template.reasoning if task.reasoning else task.template.non_reasoning
    fields = sorted(template_fields(text))
    return {"template_fields": fields, "labels": list(task.labels)}


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. OSError says why not."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _absorb(signum, frame) -> None:
    """Stand-in handler: uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown."""


def serve(config: ServeConfig, state: ServerState | None = None, *, access_log: bool = True) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (0, or 1 when the model failed to load).

    Raises:
        ConfigError: a non-loopback host without an API key or `insecure`; bad settings.
        OSError: the address cannot be bound.
    """
    import uvicorn

    check_bind(config.host, api_key=config.api_key, insecure=config.insecure)
    state = state or build_state(config)
    try:
        sock = bind_socket(config.host, config.port)
    except OSError:
        if state.log is not None:
            state.log.close()  # release the state dir
        raise
    host, port = sock.getsockname()[:2]
    app = create_app(state)
    uv_config = uvicorn.Config(
        app, workers=1, lifespan="on", access_log=access_log, server_header=False, timeout_graceful_shutdown=None,
        log_config=None, timeout_keep_alive=5,
    )
    server = uvicorn.Server(uv_config)
    status = [0]

    def fatal() -> None:
        status[0] = 1
        server.should_exit = True

    state.on_fatal = fatal
    shown = f"[{host}]" if ":" in host else host
    logger.info("listening on http://%s:%d (engine %s, model %s, task %s)", shown, port, config.engine, config.model, config.task)
    # SIGHUP reloads the calibrator and threshold once the app runs (decal.serve.app); until then
    # it must not end the process, which is its default.
    signals = (signal.SIGTERM, signal.SIGINT, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))
    previous = {sig: signal.signal(sig, _absorb) for sig in signals}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return status[0]
