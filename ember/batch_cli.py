"""Run a batch file through a running server (--url) or, without --url, through a model loaded in this process
as `ember serve` loads it (the engine flags below). A line is OpenAI's {custom_id, method, url, body} or
Fireworks' {custom_id, body}; the first line tells which, and every line must then have that shape.

Checks: the whole file before anything is sent; its first problem is reported as `line N: ...` and the command
exits 2, writing nothing. Without --url each body is checked as the server checks a batch file; with --url the
server checks each body, and one it refuses (a 4xx) is that line's error.

Endpoint and model: OpenAI lines call the `url` they carry (all the same one); Fireworks lines call --endpoint.
--model fills `body.model` where a line has none: with --url it is then required, without --url it defaults to
the loaded model's name.

Results are appended as lines complete (not in input order), one JSON line each, flushed at once, in OpenAI's
batch output format {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}: lines
answered 200 go to OUTPUT, any other answer to the error file. 408, 429 and 503 are sent again after a pause; a
server that cannot be reached is tried a few times, then the command fails.

Resume: custom_ids already in OUTPUT or the error file are skipped, so a run stopped by Ctrl-C or a kill picks up
where it stopped and each custom_id ends up exactly once across the two files (a line cut short by a kill is run
again). --overwrite starts afresh; to run the failed lines again, delete the error file.

Progress: a bar on stderr (done/total, ETA, output tokens/s) when stderr is a terminal, unless --quiet; at the end
one summary line. Ctrl-C (or SIGTERM) once: no new line is sent, those in flight finish and are written; twice:
they are aborted.

Exit status: 0 every line ran (those that failed are in the error file); 1 the command could not finish (server
unreachable, API key refused); 2 invalid input or output file; 130 interrupted (143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import httpx
from tqdm import tqdm

from ember.api.config import ServerConfig
from ember.cli import add_config_flags, config_from_args
from ember.engine.config import EngineConfig

if TYPE_CHECKING:  # the heavy modules (torch, fastapi) load only once a batch runs: --help stays instant
    from ember.api.batch.lines import Line
    from ember.engine.engine import AsyncEngine

DEFAULT_ENDPOINT = "/v1/chat/completions"
JOB_ID = "ember-batch-cli"  # what the in-process requests carry instead of an API key (ember.api.batch.inprocess)
CONNECT_PAUSES_S = (0.5, 1.0, 2.0)  # between the tries of a request that cannot reach the server at all
ABORT_GRACE_S = 1.0  # for the lines in flight to end by themselves once aborted, before their tasks are cancelled

Send = Callable[["Line"], Awaitable[tuple[int, dict[str, Any], str]]]


class CommandFailed(Exception):
    """The batch cannot go on (exit 1): no line can be answered, so none is written as failed."""


def build_parser() -> argparse.ArgumentParser:
    # "resolve": EngineConfig's --model (the weights) gives way to this command's --model (the lines' model, added
    # after it) and comes back as --model-path
    parser = argparse.ArgumentParser(prog="ember batch", description=__doc__, conflict_handler="resolve",
                                     usage="%(prog)s INPUT.jsonl -o OUTPUT.jsonl [--url http://host:port] [options]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, EngineConfig)
    a = parser.add_argument
    a("input", metavar="INPUT.jsonl", help="the batch file")
    a("-o", "--output", required=True, metavar="OUTPUT.jsonl", help="where the lines answered 200 go")
    a("--error-file", metavar="PATH", help="where the other lines go (default: OUTPUT's stem + .errors.jsonl)")
    a("--url", help="a running server, http://host:port (a trailing /v1 is dropped); without it the model runs "
                    "in this process")
    a("--api-key", default=os.environ.get("EMBER_API_KEY"), help="sent as a bearer token with --url "
                                                                 "(default $EMBER_API_KEY)")
    a("--endpoint", help=f"what Fireworks lines call (default {DEFAULT_ENDPOINT}); OpenAI lines carry their url")
    a("--model", dest="line_model", metavar="MODEL", help="body.model for the lines without one")
    a("-c", "--concurrency", type=int, default=16, help="lines in flight (default %(default)s)")
    a("--timeout", type=float, default=600.0, help="seconds per request with --url (default %(default)s)")
    a("--overwrite", action="store_true", help="start afresh instead of skipping the lines already written")
    a("-q", "--quiet", action="store_true", help="no progress bar")
    local = parser.add_argument_group("the model without --url (with the EngineConfig flags, as `ember serve` "
                                      "loads it)")
    local.add_argument("--model-path", dest="model", metavar="PATH", default=os.environ.get("EMBER_MODEL"),
                       help="GGUF file or Hugging Face folder: `ember serve --model` (env EMBER_MODEL; default the "
                            "bundled SmolLM2)")
    local.add_argument("--served-model-name", help="the name lines call it by (default as `ember serve`)")
    local.add_argument("--generation-config", metavar="JSON", help="sampling defaults (as `ember serve`)")
    return parser


def detect(data: bytes) -> tuple[str, Any]:
    """The file's shape and its first line's url: OpenAI's lines carry `method` and `url`, Fireworks' do not."""
    first = next((raw for raw in data.split(b"\n") if raw.strip()), b"")
    try:
        record = json.loads(first)
    except ValueError:  # reported with its line number by check_lines
        return "fireworks", None
    if isinstance(record, dict) and ("url" in record or "method" in record):
        return "openai", record.get("url")
    return "fireworks", None


def check_lines(data: bytes, shape: str, endpoint: str, model: str | None) -> list[Line]:
    """Each line's own fields as the server checks them (JSON, shape, a unique custom_id, the url), and a model for
    each; not the bodies, which only the server that runs them can judge. `model` fills a missing body.model."""
    from ember.api.batch.lines import InvalidFile, parse_lines

    lines = parse_lines(data, shape, endpoint, None, {"model": model} if model else {})
    missing = next((line for line in lines if "model" not in line.body), None)
    if missing is not None:
        raise InvalidFile("the line has no `body.model`: name one with --model", missing.number)
    return lines


def _written(path: Path) -> tuple[set[str], int]:
    """The custom_ids a results file holds, and the length of its whole lines (a line cut short by a kill is
    dropped, and its request runs again)."""
    from ember.api.batch.lines import InvalidFile

    if not path.exists():
        return set(), 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    ids: set[str] = set()
    for number, raw in enumerate(data[:end].splitlines(), 1):
        try:
            ids.add(json.loads(raw)["custom_id"])
        except (ValueError, KeyError, TypeError):
            raise InvalidFile(f"{path} line {number} is not a result line (--overwrite to start afresh)") from None
    return ids, end


class Results:
    """OUTPUT and the error file, appended line by line and flushed (a kill loses only the line being written),
    and what this run has added to them, for the progress bar and the summary."""

    def __init__(self, output: Path, errors: Path, overwrite: bool) -> None:
        self.paths = {True: output, False: errors}
        kept = {ok: (set(), 0) if overwrite else _written(path) for ok, path in self.paths.items()}
        self.done = kept[True][0] | kept[False][0]
        self.lengths = {ok: length for ok, (_, length) in kept.items()}
        self.files: dict[bool, BinaryIO] = {}
        self.ok = self.failed = self.prompt_tokens = self.output_tokens = self.skipped = 0
        self.started = time.monotonic()
        self.bar: tqdm

    def open(self, total: int, skipped: int, quiet: bool) -> None:
        """Cut each file back to its whole lines (to nothing with --overwrite); OUTPUT is created now, the error
        file at the first failure. `skipped`: the input's lines already written."""
        for path, length in zip(self.paths.values(), self.lengths.values(), strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                os.truncate(path, length)
        self.files[True] = self.paths[True].open("ab")
        self.skipped, self.started = skipped, time.monotonic()
        self.bar = tqdm(total=total, initial=skipped, unit="line", file=sys.stderr, dynamic_ncols=True,
                        disable=quiet or not sys.stderr.isatty())

    def add(self, line: Line, status: int, request_id: str, answer: dict[str, Any]) -> None:
        from ember.api.batch.outcome import output_line, usage_of

        ok = status == 200
        record = output_line("batch_req_" + secrets.token_hex(12), line.custom_id,
                             {"status_code": status, "request_id": request_id, "body": answer})
        if ok not in self.files:
            self.files[ok] = self.paths[ok].open("ab")
        self.files[ok].write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self.files[ok].flush()
        if ok:
            usage = usage_of(answer)
            self.ok += 1
            self.prompt_tokens += usage["input_tokens"]
            self.output_tokens += usage["output_tokens"]
        else:
            self.failed += 1
        self.bar.set_postfix_str(f"{self.output_tokens / self._wall():.1f} out tok/s", refresh=False)
        self.bar.update()

    def _wall(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def close(self) -> str:
        """The summary line."""
        self.bar.close()
        for file in self.files.values():
            file.close()
        errors = f" (in {self.paths[False]})" if self.failed else ""
        return (f"{self.ok} ok, {self.failed} failed{errors}, {self.skipped} done before; {self.prompt_tokens} "
                f"prompt + {self.output_tokens} output tokens, {self.output_tokens / self._wall():.1f} output tok/s, "
                f"{self._wall():.1f} s")


class Interrupts:
    """Ctrl-C or SIGTERM once: `stop` (send no new line); twice: `abort` (drop the lines in flight too). The
    handlers run on the main thread, which without --url runs the engine, so they only pass the news to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.signal = loop, 0
        self.stop, self.abort = asyncio.Event(), asyncio.Event()
        self.previous = {s: signal.signal(s, self._received) for s in (signal.SIGINT, signal.SIGTERM)}

    def _received(self, signum: int, _frame: object) -> None:
        self.signal = signum
        self.loop.call_soon_threadsafe(self._escalate)

    def _escalate(self) -> None:
        if self.stop.is_set():
            self.abort.set()
            return
        self.stop.set()
        tqdm.write("ember batch: stopping: the lines in flight finish (Ctrl-C again to abort them)", file=sys.stderr)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


async def _drive(lines: list[Line], send: Send, results: Results, concurrency: int, interrupts: Interrupts) -> None:
    """Keep `concurrency` of the (not empty) lines in flight until all are written, a stop, an abort or a
    CommandFailed."""
    from ember.api.batch.outcome import RETRY_PAUSE_S, RETRY_STATUSES

    todo = deque(lines)

    async def worker() -> None:
        while todo and not interrupts.stop.is_set():
            line = todo.popleft()
            status, answer, request_id = await send(line)
            while status in RETRY_STATUSES and not interrupts.stop.is_set():
                await asyncio.sleep(RETRY_PAUSE_S)
                status, answer, request_id = await send(line)
            if status in RETRY_STATUSES or status == 499:
                return  # not answered (stopped, or aborted in-process): the next run sends it again
            results.add(line, status, request_id, answer)

    workers = {asyncio.create_task(worker()) for _ in range(min(concurrency, len(todo)))}
    aborted = asyncio.create_task(interrupts.abort.wait())
    try:
        running = set(workers)
        while running and not aborted.done():
            done, running = await asyncio.wait(running | {aborted}, return_when=asyncio.FIRST_COMPLETED)
            running.discard(aborted)
            for task in done - {aborted}:
                task.result()  # a CommandFailed
    finally:
        # in-process requests see their client go (the app looks every 0.2 s) and answer 499; a remote request
        # is cancelled, which closes its connection and so aborts it on the server
        interrupts.abort.set()
        _, late = await asyncio.wait(workers, timeout=ABORT_GRACE_S)
        for task in (*late, aborted):
            task.cancel()
        await asyncio.gather(*workers, aborted, return_exceptions=True)


@asynccontextmanager
async def _remote(url: str, api_key: str | None, endpoint: str, concurrency: int,
                  timeout: float) -> AsyncIterator[Send]:
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout, limits=limits) as client:

        async def post(body: dict[str, Any]) -> httpx.Response:
            pauses = iter(CONNECT_PAUSES_S)
            while True:
                try:
                    return await client.post(endpoint, json=body)
                except httpx.TransportError as exc:
                    pause = next(pauses, None)
                    if pause is None:
                        raise CommandFailed(f"cannot reach {base}{endpoint}: {exc!r}") from exc
                    await asyncio.sleep(pause)

        async def send(line: Line) -> tuple[int, dict[str, Any], str]:
            response = await post(line.body)
            try:
                answer = response.json()
            except ValueError:  # a proxy's error page, say
                answer = {"error": {"message": response.text[:500], "type": "invalid_response"}}
            if response.status_code == 401:  # no line can succeed: stop rather than fill the error file
                raise CommandFailed(f"{base} refused the API key (401): {json.dumps(answer)[:300]}")
            return response.status_code, answer, response.headers.get("x-request-id", "")

        yield send


def _execute(lines: list[Line], total: int, results: Results, args: argparse.Namespace,
             sender: Callable[[Interrupts], AbstractAsyncContextManager[Send]], engine: AsyncEngine | None) -> int:
    """Run the lines; with an engine, the event loop gets another thread and the engine's loop this one (the main
    thread, where torch's small CPU kernels run fastest, as in `ember serve`)."""
    loop = asyncio.new_event_loop()
    interrupts = Interrupts(loop)
    raised: list[BaseException] = []

    async def main() -> None:
        async with sender(interrupts) as send:
            await _drive(lines, send, results, args.concurrency, interrupts)

    def in_loop() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # raised again on the main thread
            raised.append(exc)
        finally:
            if engine is not None:
                engine.shutdown()

    results.open(total, total - len(lines), args.quiet)
    if engine is None:
        in_loop()
    else:
        engine.reserve_current_thread()
        thread = threading.Thread(target=in_loop, name="ember-batch")
        thread.start()
        engine.run()
        thread.join()
    interrupts.restore()
    loop.close()  # only now: the engine's last step may still have handed the loop its outputs
    print(f"ember batch: {results.close()}", file=sys.stderr)
    if raised and isinstance(raised[0], CommandFailed):
        print(f"ember batch: {raised[0]}", file=sys.stderr)
        return 1
    if raised:
        raise raised[0]
    return 128 + interrupts.signal if interrupts.signal else 0


def _in_process(args: argparse.Namespace, data: bytes, shape: str, endpoint: str, model: str, lines: list[Line],
                total: int, results: Results) -> int:
    """The model loaded as `ember serve` loads it, each line sent through the app in-process; the bodies are
    checked against it first, as the server checks a batch file."""
    from ember.api.app import create_app
    from ember.api.batch.inprocess import call
    from ember.api.batch.lines import InvalidFile, read_lines
    from ember.serving.models import ModelRegistry, load_served_model

    served = load_served_model(config_from_args(EngineConfig, args), args.served_model_name, args.generation_config)
    registry = ModelRegistry([served])
    try:
        read_lines(data, shape, endpoint, registry, None, {"model": model}, max_lines=sys.maxsize)
    except InvalidFile as exc:
        print(f"ember batch: {args.input}: {exc}", file=sys.stderr)
        return 2
    app = create_app(registry, ServerConfig(served_model_name=args.served_model_name,
                                            generation_config=args.generation_config, metrics=False), store=None)

    @asynccontextmanager
    async def sender(interrupts: Interrupts) -> AsyncIterator[Send]:
        async with app.router.lifespan_context(app):
            yield lambda line: call(app, endpoint, line.body, JOB_ID, interrupts.abort)

    return _execute(lines, total, results, args, sender, served.engine)


def run(args: argparse.Namespace) -> int:
    from ember.api.batch.lines import InvalidFile
    from ember.serving.models import served_name_for

    if args.concurrency < 1:
        print("ember batch: --concurrency must be at least 1", file=sys.stderr)
        return 2
    output = Path(args.output)
    errors = Path(args.error_file) if args.error_file else output.with_name(output.stem + ".errors.jsonl")
    try:
        data = Path(args.input).read_bytes()
        shape, url = detect(data)
        endpoint = args.endpoint or (url if shape == "openai" and isinstance(url, str) else DEFAULT_ENDPOINT)
        model = args.line_model or (None if args.url else args.served_model_name or served_name_for(args.model))
        lines = check_lines(data, shape, endpoint, model)
    except (OSError, InvalidFile) as exc:
        print(f"ember batch: {args.input}: {exc}", file=sys.stderr)
        return 2
    try:
        results = Results(output, errors, args.overwrite)
    except InvalidFile as exc:
        print(f"ember batch: {exc}", file=sys.stderr)
        return 2
    todo = [line for line in lines if line.custom_id not in results.done]
    if not todo:
        print(f"ember batch: all {len(lines)} lines are in {output} or {errors} already (--overwrite to run them "
              "again)", file=sys.stderr)
        return 0
    if args.url is None:
        return _in_process(args, data, shape, endpoint, model, todo, len(lines), results)
    return _execute(todo, len(lines), results, args,
                    lambda _: _remote(args.url, args.api_key, endpoint, args.concurrency, args.timeout), None)
