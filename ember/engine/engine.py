"""The engine: `step()` = schedule → run → sample → postprocess, and a thread that drives it for asyncio."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ember.engine.block_manager import BlockManager
from ember.engine.config import EngineConfig
from ember.engine.loop_thread import LoopThread
from ember.engine.request import MAX_LOGPROBS, SamplingParams, StepOutput
from ember.engine.runner import KVLayout, ModelRunner
from ember.engine.sampler import prompt_logprobs, sample
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Sequence
from ember.engine.spec.policy import MAX_DRAFTS, DraftState, new_draft_state
from ember.engine.spec.verify import Run, verify
from ember.engine.step import StepItem
from ember.kernels import cpu as cpu_kernels
from ember.models.gemma3 import Gemma3Model
from ember.models.llama import LlamaModel

if TYPE_CHECKING:
    from ember.models.config import ModelConfig
    from ember.models.loader import LoadedWeights

log = logging.getLogger("ember.engine")


@dataclass
class EngineCounters:
    """Monotonic counters; tests and /stats read them to see batching and caching at work."""

    steps: int = 0
    scheduled_seqs: int = 0  # summed over steps: > steps means sequences shared forward passes
    max_batch_seqs: int = 0
    prompt_tokens: int = 0  # prompt tokens computed (not served from the cache)
    cached_tokens: int = 0
    generated_tokens: int = 0
    requests: int = 0


@dataclass
class StepPhases:
    """Seconds one step spent in each phase, so that a slow step can be explained (the /metrics histogram)."""

    schedule: float
    prepare: float  # batch tensors
    forward: float  # the model, logits included
    sample: float
    postprocess: float  # sequence bookkeeping, prefix-cache commits, outputs
    batch: int  # sequences in the step


SPECULATION_MODES = ("prompt-lookup", "off")
MODEL_CLASSES = {"gemma3": Gemma3Model}  # by config.architecture; the Llama family (llama, mistral, qwen2) else
WEIGHT_FORMATS = ("auto", "quantized", "float32", "bfloat16", "float16")


@dataclass
class Placement:
    """Where and how the model runs, resolved from an EngineConfig."""

    device: torch.device
    dtype: torch.dtype  # activations, KV cache and dense weights
    packed: bool  # GGUF blocks kept packed for the CPU kernels


def resolve_device(config: EngineConfig) -> Placement:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if config.weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, not {config.weights!r}")
    on_cpu = device.type == "cpu"
    packed = config.weights == "quantized" or (config.weights == "auto" and on_cpu and config.dtype in
                                               ("auto", "float32") and cpu_kernels.available())
    if packed:
        if not on_cpu:
            raise ValueError("--weights quantized runs on Ember's CPU kernels; on CUDA use bfloat16 or float32")
        cpu_kernels.lib()  # a missing build fails here, with the way to fix it
        if config.dtype not in ("auto", "float32"):
            raise ValueError("--weights quantized computes in float32; leave --dtype at auto or float32")
        return Placement(device, torch.float32, True)
    if config.dtype != "auto":
        return Placement(device, getattr(torch, config.dtype), False)
    if config.weights in ("float32", "bfloat16", "float16"):
        return Placement(device, getattr(torch, config.weights), False)
    return Placement(device, torch.float32 if on_cpu else torch.bfloat16, False)


class LLMEngine:
    """Synchronous core: add requests, call step(), collect outputs. Not thread-safe on its own."""

    def __init__(self, config: EngineConfig, weights: LoadedWeights, eos_token_ids: list[int]) -> None:
        self.config = config
        self.eos_token_ids = set(eos_token_ids)
        if config.speculation not in SPECULATION_MODES:
            raise ValueError(f"speculation must be one of {', '.join(SPECULATION_MODES)}, not {config.speculation!r}")
        if not (1 <= config.max_draft_tokens <= MAX_DRAFTS and config.ngram_max >= 1):
            raise ValueError(f"max_draft_tokens must be 1..{MAX_DRAFTS} and ngram_max at least 1")
        placement = resolve_device(config)
        device, dtype = placement.device, placement.dtype
        if placement.packed:
            # Ember's kernels do the heavy work on their own pool; torch's OpenMP threads would only spin
            # between its small ops and take the cores from that pool (measured: decode 1.3-1.6x slower)
            threads = config.threads or len(os.sched_getaffinity(0))
            if cpu_kernels.num_threads() != threads:  # one pool for the process: every model's engine shares it
                cpu_kernels.set_num_threads(threads)
        # torch's threads for the thread that steps this engine (AsyncEngine's loop sets them in its own thread)
        self.torch_threads = 1 if placement.packed else config.threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(self.torch_threads)
        self.device = device
        model_class = MODEL_CLASSES.get(weights.config.architecture, LlamaModel)
        self.model = model_class(weights.config, weights.tensors, device, dtype)
        layout, num_blocks, capacity = kv_layout(config, weights.config, dtype)
        self.max_model_len = min(weights.config.max_position_embeddings,
                                 config.max_model_len or weights.config.max_position_embeddings, capacity)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                          layout.window, layout.window_groups)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.eos_token_ids, self.max_model_len)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, layout)
        self.seqs: dict[str, dict[int, Sequence]] = {}  # request id -> sample index -> live sequence
        self.counters = EngineCounters()
        self.last_step: StepPhases | None = None
        self.on_step: Callable[[StepPhases], None] | None = None  # e.g. metrics; called on the engine thread
        self._seed_rng = random.Random(config.seed)
        self.scheduler.step_cost.calibrate(self._time_forward, min(config.max_num_batched_tokens,
                                                                   num_blocks * config.block_size))
        log.info("engine ready", extra={"device": str(device), "dtype": str(dtype), "kv_blocks": num_blocks,
                                        "weights": "quantized" if placement.packed else str(dtype),
                                        "weight_mb": round(self.model.weight_bytes / 2**20, 1),
                                        "max_model_len": self.max_model_len})

    def _time_forward(self, tokens: int) -> float:
        """Seconds of one forward pass of `tokens` query positions with a logit row each (a decode and its
        drafts) and their greedy verification, for the draft policy's cost table. Run at start-up, when
        every block is free and empty."""
        seq = Sequence("calibration", [0], 1, SamplingParams(temperature=0))
        seq.block_table = list(range(-(-tokens // self.config.block_size)))
        seq.window_tables = [seq.block_table] * self.block_manager.window_groups
        start = time.perf_counter()
        sample(self.runner.run([StepItem(seq, 1, [0] * (tokens - 1))]), [seq] * tokens)
        return time.perf_counter() - start

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Reject what could never run; the serving layer turns these into 400s before they get here."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; this model's context holds "
                             f"{self.max_model_len} including at least one generated token")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids) or any(not 0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        if params.max_tokens < 0 or params.n < 1:
            raise ValueError("max_tokens must be at least 0 and n at least 1")
        if any(k is not None and not 0 <= k <= MAX_LOGPROBS for k in (params.logprobs, params.prompt_logprobs)):
            raise ValueError(f"logprobs must lie in [0, {MAX_LOGPROBS}]")
        if params.repetition_penalty <= 0 or (params.mirostat_target is not None and params.mirostat_target <= 0):
            raise ValueError("repetition_penalty and mirostat_target must be positive")

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.greedy:
            return None
        seed = params.seed + index if params.seed is not None else self._seed_rng.getrandbits(63)
        return torch.Generator(device=self.device).manual_seed(seed)

    def _drafting(self, params: SamplingParams) -> DraftState | None:
        lookup = self.config.speculation == "prompt-lookup" and params.speculate
        return new_draft_state(params.prediction[:params.max_tokens] if params.prediction else None, lookup,
                               self.scheduler.draft_priors, self.config.max_draft_tokens, self.config.ngram_max)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.validate(prompt_token_ids, params)
        if request_id in self.seqs:
            raise ValueError(f"duplicate request id {request_id!r}")
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params,
                       self._generator(params, 0), pending_forks=params.n - 1, drafting=self._drafting(params))
        self.seqs[request_id] = {0: seq}
        self.scheduler.add(seq)
        self.counters.requests += 1

    def abort(self, request_id: str, index: int | None = None) -> list[StepOutput]:
        """Drop a request's samples (all, or one); an "abort" output for each one that was alive."""
        samples = self.seqs.get(request_id, {})
        outputs = []
        for seq in [s for i, s in samples.items() if index in (None, i)]:
            self._drop(seq)
            for i in (seq.index, *range(1, seq.pending_forks + 1)):  # forks never made die with it
                outputs.append(StepOutput(request_id, [], True, "abort", seq.num_prompt_tokens, index=i))
        return outputs

    def _drop(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        samples = self.seqs[seq.request_id]
        del samples[seq.index]
        if not samples:
            del self.seqs[seq.request_id]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _score_prompt(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens this chunk's positions predict (position j predicts j + 1)."""
        targets = seq.token_ids[start + 1:seq.num_prompt_tokens][:logits.shape[0]]
        if targets:
            seq.prompt_logprobs[start + 1:start + 1 + len(targets)] = prompt_logprobs(
                logits[:len(targets)], targets, seq.params.prompt_logprobs)

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """Split off a sequence's other n - 1 samples once its prompt is computed: they share its KV
        blocks (the partly filled last one copied), so the prompt is computed once for all n."""
        children = []
        for i in range(1, seq.pending_forks + 1):
            child = Sequence(seq.request_id, list(seq.token_ids), seq.num_prompt_tokens, seq.params,
                             self._generator(seq.params, i), index=i, num_cached_tokens=seq.num_cached_tokens,
                             prompt_logprobs=seq.prompt_logprobs, timings=dataclasses.replace(seq.timings),
                             drafting=self._drafting(seq.params))
            bm = self.block_manager
            if seq.num_computed_tokens % self.config.block_size == 0 or bm.num_free_blocks >= bm.groups:
                for source, destination in bm.fork(seq, child):
                    self.runner.copy_block(source, destination)
            self.scheduler.add_fork(child)
            self.seqs[seq.request_id][i] = child
            children.append(child)
        seq.pending_forks = 0
        return children

    def _prompt_only(self, seq: Sequence) -> list[StepOutput]:
        """max_tokens 0: the prompt is computed (and scored); every sample ends without a token."""
        self._drop(seq)
        return [StepOutput(seq.request_id, [], True, "length", seq.num_prompt_tokens, seq.num_cached_tokens,
                           index=i, prompt_logprobs=seq.prompt_logprobs) for i in range(seq.params.n)]

    def step(self) -> list[StepOutput]:
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        scheduled = time.perf_counter()
        logits = self.runner.run(batch)
        ran = time.perf_counter()
        c = self.counters
        c.steps += 1
        c.scheduled_seqs += len(batch)
        c.max_batch_seqs = max(c.max_batch_seqs, len(batch))
        outputs: list[StepOutput] = []
        runs: list[Run] = []
        row = 0
        for item in batch:
            seq, num_rows = item.seq, item.num_logit_rows
            if seq.scores_prompt:
                self._score_prompt(seq, item.start, logits[row:row + num_rows])
            if item.start < seq.num_prompt_tokens:
                c.prompt_tokens += min(item.start + item.num_new_tokens, seq.num_prompt_tokens) - item.start
            if not item.drafts:
                self.scheduler.computed(item)
            row += num_rows
            if not item.samples:
                continue
            if seq.params.max_tokens == 0:
                outputs += self._prompt_only(seq)
                continue
            runs += [Run(s, item, row - item.num_sample_rows, item.drafts if s is seq else [])
                     for s in (seq, *self._fork(seq))]
        sampling_start = time.perf_counter()
        verify(runs, logits, self.scheduler.append)
        sampled = time.perf_counter()
        # what drafts cost is the forward pass and the verification's sampling
        self.scheduler.step_cost.observe(sum(item.num_query_tokens for item in batch),
                                         (ran - scheduled) + (sampled - sampling_start))
        for run in runs:
            if run.drafts:
                self.scheduler.computed(run.item, run.accepted)
            outputs.append(self._output(run))
        done = time.perf_counter()
        prepare = self.runner.last_prepare_seconds
        self.last_step = StepPhases(scheduled - start, prepare, ran - scheduled - prepare, sampled - sampling_start,
                                    (sampling_start - ran) + (done - sampled), len(batch))
        if self.on_step is not None:
            self.on_step(self.last_step)
        return outputs

    def _output(self, run: Run) -> StepOutput:
        seq, c = run.seq, self.counters
        first = seq.num_output_tokens == len(run.tokens)
        c.generated_tokens += len(run.tokens)
        if first and seq.index == 0:
            c.cached_tokens += seq.num_cached_tokens
        if run.reason is not None:
            samples = self.seqs[seq.request_id]
            del samples[seq.index]
            if not samples:
                del self.seqs[seq.request_id]
        prompt = None
        if first and seq.prompt_logprobs is not None:
            prompt, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        spec = None
        if seq.drafting is not None:
            stats = seq.drafting.stats
            spec = dataclasses.replace(stats, position_hits=list(stats.position_hits),
                                       position_totals=list(stats.position_totals))
        return StepOutput(seq.request_id, run.tokens, run.reason is not None, run.reason, seq.num_prompt_tokens,
                          seq.num_cached_tokens, seq.index,
                          run.logprobs if seq.params.logprobs is not None else None, prompt, seq.timings, spec)

    def stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {**vars(self.counters), "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting), "kv_blocks_used": bm.num_used_blocks,
                "kv_blocks_cached": len(bm.cached), "kv_blocks_total": bm.num_blocks,
                "preemptions": self.scheduler.num_preemptions, "max_num_seqs": self.config.max_num_seqs}


class AsyncEngine(LoopThread):
    """Runs an LLMEngine's loop off the asyncio event loop (torch releases the GIL in kernels), where
    ember.engine.loop_thread places it.

    Requests and aborts go in through a locked list; each step's outputs come back to every caller's
    asyncio.Queue with one `call_soon_threadsafe` per event loop.
    """

    thread_name = "ember-engine"

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine.torch_threads)
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self._lock = threading.Lock()
        self._commands: list[tuple] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    def _submit(self, command: tuple) -> None:
        with self._lock:
            self._commands.append(command)
        self._wake.set()

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop all of a request's samples, or one; its stream gets an "abort" output for each."""
        self._submit(("abort", request_id, index))

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[StepOutput]:
        """Stream the outputs of all params.n samples until each has finished; closing or cancelling
        the iterator aborts the unfinished ones at the next step."""
        self.engine.validate(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._submit(("add", request_id, prompt_token_ids, params))
        unfinished = params.n
        try:
            while unfinished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                unfinished -= out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if unfinished:
                self.abort(request_id)

    def _deliver(self, outputs: list[StepOutput | tuple[str, BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for out in outputs:
            request_id, item = (out.request_id, out) if isinstance(out, StepOutput) else out
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _apply(self, command: tuple) -> list[StepOutput | tuple[str, BaseException]]:
        if command[0] == "abort":
            return self.engine.abort(command[1], command[2])
        _, request_id, prompt, params = command
        try:
            self.engine.add_request(request_id, prompt, params)
        except ValueError as exc:
            return [(request_id, exc)]
        return []

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                commands, self._commands = self._commands, []
            replies = [r for command in commands for r in self._apply(command)]
            if replies:
                self._deliver(replies)
            if not self.engine.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug: fail every request in flight rather than hang them
                log.exception("engine step failed")
                outputs = [(rid, RuntimeError(f"engine failure: {exc}")) for rid in list(self.engine.seqs)]
                for rid in list(self.engine.seqs):
                    self.engine.abort(rid)
            self._deliver(outputs)
        self._close_streams()

    def _close_streams(self) -> None:
        """At shutdown (a model unloaded, the server stopping): what runs ends as aborted and what never reached
        the engine fails, so no caller waits for a loop that is gone."""
        with self._lock:
            commands, self._commands = self._commands, []
        aborted = [out for rid in list(self.engine.seqs) for out in self.engine.abort(rid)]
        running = {out.request_id for out in aborted}
        never_ran = [(c[1], RuntimeError("the model was unloaded")) for c in commands
                     if c[0] == "add" and c[1] not in running]
        self._deliver([*aborted, *never_ran])


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def kv_layout(config: EngineConfig, model: ModelConfig, dtype: torch.dtype) -> tuple[KVLayout, int, int]:
    """How the KV cache is laid out: (layout, blocks, the longest sequence they hold). A sliding-window model's
    window layers keep only their window's blocks (ember.engine.block_manager) when that leaves room for a sequence
    of at least twice the window beside its window groups' blocks; else (or with --no-sliding-window-kv) all
    layers share each block, as any other model's do."""
    bs = config.block_size

    def blocks(layout: KVLayout) -> int:
        per_block = layout.bytes_per_block(model, bs, dtype)
        return config.num_kv_blocks or max(1, config.kv_cache_memory_mb * 2**20 // per_block)

    grouped = KVLayout.grouped(model) if config.sliding_window_kv else None
    if grouped is not None:
        num_blocks = blocks(grouped)
        # a window group's blocks for one step: its window behind the first query, the step's tokens, one partial
        window_blocks = -(-(grouped.window - 1 + max(config.max_num_batched_tokens, MAX_DRAFTS + 1)) // bs) + 1
        capacity = (num_blocks - 1 - grouped.window_groups * window_blocks) * bs  # (block 0: the null block)
        if capacity >= 2 * grouped.window:
            return grouped, num_blocks, capacity
    single = KVLayout.single(model.num_layers)
    num_blocks = blocks(single)
    return single, num_blocks, num_blocks * bs


def build_async_engine(config: EngineConfig, weights: LoadedWeights, eos_token_ids: list[int]) -> AsyncEngine:
    return AsyncEngine(LLMEngine(config, weights, eos_token_ids))
