"""Where model work runs. The pipeline's generate and score stages cut their work into chunks (the
units they commit), hand them to an executor with the model to use, and commit each chunk's result
as it comes back; only the pipeline's process writes the cache. So a stage does not care where the
work ran, and a killed worker or driver loses at most the chunks not yet committed.

- `local` (the default): in this process, chunks in order, one model loaded at a time.
- `ray`: a pool of Ray actors, one model replica each (one GPU each where the cluster has GPUs),
  chunks spread over them and returned in the order they finish. A lost actor is restarted by Ray
  and its unfinished chunks retried there (RAY_MAX_RESTARTS, RAY_MAX_TASK_RETRIES).

Ray is optional (requirements-ray.txt, the `ray` extra): nothing imports it unless `ray` is chosen.
Every node of a cluster needs the same environment (this project installed, the same torch) and
the models at the same paths or hub ids. Limitation: an actor holds one GPU, so a model must fit in
one GPU's memory (no device_map across an actor's GPUs yet).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from core.errors import CircuitdiffError, InputError
from core.models import ModelSpec, resolve_device
from core.settings import GenerationSettings, ScoreSettings
from core.vocab import EXECUTORS, ExecutorName

# Times Ray restarts a lost actor, and retries a chunk whose actor was lost while it ran. A chunk
# that raises (a bad sample, out of memory) is not retried: the error reaches the driver.
RAY_MAX_RESTARTS = 3
RAY_MAX_TASK_RETRIES = 3
# Chunks queued per actor: the next one waits in the actor while the driver commits the last.
CHUNKS_PER_ACTOR = 2
# Seconds to wait for a TCP connection to a cluster's address before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0
# Seconds between "still waiting for actors" lines while the cluster has no room for them.
PLACEMENT_LOG_S = 60.0


class ExecutorUnavailableError(CircuitdiffError):
    """The chosen executor cannot run here (Ray missing, or the cluster unreachable)."""


class WorkerLostError(CircuitdiffError):
    """A Ray actor died more often than Ray restarts it."""


@dataclasses.dataclass(frozen=True)
class GenerationJob:
    """What every generation chunk of one model shares."""

    spec: ModelSpec
    tokenizer: Any
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    settings: GenerationSettings
    device: str


@dataclasses.dataclass(frozen=True)
class GeneratedChunk:
    generations: list  # core.generation.Generation, one per prompt, in the prompts' order
    seconds: float  # wall time per answer
    backend: str


class ModelWorker:
    """Holds one model replica at a time and does the model work of one chunk. The local executor
    runs one in its own process; the Ray executor runs one per actor."""

    def __init__(self) -> None:
        self.model = None
        self.loaded: tuple | None = None
        self.loads = 0

    def _model(self, spec: ModelSpec, dtype: str, device: str):
        if self.loaded != (spec, dtype, device):
            self.release()
            self.model = spec.load(dtype=dtype, device=device)
            self.loaded = (spec, dtype, device)
            self.loads += 1
        return self.model

    def generate(self, job: GenerationJob, prompts: Sequence[Sequence[int]]) -> GeneratedChunk:
        from core import generation

        began = time.perf_counter()
        if job.settings.gen_backend == "vllm":
            self.release()  # vLLM loads its own copy of the weights
            results = generation.generate_vllm(job.spec, job.tokenizer, prompts, job.max_new_tokens,
                                               job.stop_strings, job.settings.gen_dtype)
        else:
            model = self._model(job.spec, job.settings.gen_dtype, job.device)
            results = generation.generate_greedy_detailed(
                model, job.tokenizer, prompts, job.max_new_tokens, job.stop_strings,
                batch_size=job.settings.gen_batch_size)
        return GeneratedChunk(results, (time.perf_counter() - began) / len(prompts),
                              job.settings.gen_backend)

    def score(self, spec: ModelSpec, settings: ScoreSettings, samples: Sequence):
        from core.eap import score_samples

        return score_samples(self._model(spec, settings.dtype, settings.device), samples, settings)

    def release(self) -> None:
        """Free the model's memory before another is loaded (two 7B models rarely fit together)."""
        if self.model is None:
            return
        import gc

        import torch

        self.model.to("meta")
        self.model, self.loaded = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        """Where this worker runs; `restarted` is true in an actor Ray has restarted."""
        import ray

        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "device": resolve_device("auto"), "restarted": context.was_current_actor_reconstructed}


class LocalExecutor:
    """In this process: chunks in order, as the stages always ran them."""

    def __init__(self) -> None:
        self.worker = ModelWorker()

    @property
    def replicas(self) -> int:
        return 1

    @property
    def models_loaded(self) -> int:
        return self.worker.loads

    def generate(self, job: GenerationJob, chunks: Sequence[Sequence[Sequence[int]]]
                 ) -> Iterator[tuple[int, GeneratedChunk]]:
        for index, prompts in enumerate(chunks):
            yield index, self.worker.generate(job, prompts)

    def score(self, spec: ModelSpec, settings: ScoreSettings, chunks: Sequence[Sequence]
              ) -> Iterator[tuple[int, Any]]:
        for index, samples in enumerate(chunks):
            yield index, self.worker.score(spec, settings, samples)

    def release(self) -> None:
        self.worker.release()

    def close(self) -> None:
        self.worker.release()


class RayExecutor:
    """A pool of Ray actors, each a ModelWorker, made at the first chunk and killed by `close`.

    `address`: None starts Ray on this machine (or joins RAY_ADDRESS, Ray's own rule), "auto" joins
    the cluster this machine belongs to, "HOST:PORT" the cluster whose head listens there. A driver
    already connected to Ray (ray.init called by the caller) keeps its connection. `actors`: pool
    size; 0 takes one per GPU of the cluster, or one per CPU where it has none.
    """

    def __init__(self, address: str | None = None, actors: int = 0, device: str = "auto",
                 log: Callable[[str], None] = print):
        self.address, self.actors, self.device, self.log = address, actors, device, log
        self.pool: list = []
        self.connected_here = False
        # (actor, model) pairings since the last release, and replicas loaded in all.
        self.assigned: set[tuple[int, tuple]] = set()
        self.loads = 0

    @property
    def replicas(self) -> int:
        return len(self._pool())

    @property
    def models_loaded(self) -> int:
        """Model replicas asked for (an actor reloading its model after a restart is not counted)."""
        return self.loads

    def generate(self, job: GenerationJob, chunks: Sequence[Sequence[Sequence[int]]]
                 ) -> Iterator[tuple[int, GeneratedChunk]]:
        import ray

        self._pool()  # connects first: ray.put alone would start a Ray of its own
        job_ref = ray.put(job)  # the tokenizer travels once, not with every chunk
        model = (job.spec, job.settings.gen_dtype)
        return self._map(lambda actor, prompts: actor.generate.remote(job_ref, prompts), model, chunks)

    def score(self, spec: ModelSpec, settings: ScoreSettings, chunks: Sequence[Sequence]
              ) -> Iterator[tuple[int, Any]]:
        return self._map(lambda actor, samples: actor.score.remote(spec, settings, samples),
                         (spec, settings.dtype), chunks)

    def _map(self, submit, model: tuple, chunks: Sequence) -> Iterator[tuple[int, Any]]:
        """(chunk index, result) of every chunk, in the order they finish; each actor keeps
        CHUNKS_PER_ACTOR chunks queued, so none idles while the driver commits."""
        import ray

        pool = self._pool()
        waiting = collections.deque(enumerate(chunks))
        running: dict = {}

        def send(position: int) -> None:
            index, chunk = waiting.popleft()
            running[submit(pool[position], chunk)] = (index, position)
            if (position, model) not in self.assigned:
                self.assigned.add((position, model))
                self.loads += 1
        for _ in range(CHUNKS_PER_ACTOR):
            for position in range(len(pool)):
                if waiting:
                    send(position)
        while running:
            [ready], _ = ray.wait(list(running), num_returns=1)
            index, position = running.pop(ready)
            try:
                result = ray.get(ready)
            except ray.exceptions.RayActorError as error:
                raise WorkerLostError(f"Ray actor {position} was lost more often than its "
                                      f"{RAY_MAX_RESTARTS} restarts allow ({error}); look at the "
                                      f"Ray logs of its node, then rerun: committed work is "
                                      f"kept") from None
            if waiting:
                send(position)
            yield index, result

    def release(self) -> None:
        import ray

        ray.get([actor.release.remote() for actor in self.pool])
        self.assigned.clear()

    def close(self) -> None:
        if not self.pool and not self.connected_here:
            return
        import ray

        for actor in self.pool:
            ray.kill(actor)
        self.pool = []
        if self.connected_here:
            ray.shutdown()
            self.connected_here = False

    def _pool(self) -> list:
        if self.pool:
            return self.pool
        ray, self.connected_here = _connect(self.address)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if self.device != "cpu" else 0
        size = self.actors or gpus or int(resources.get("CPU", 1))
        actor_class = ray.remote(ModelWorker)
        # Named, so `ray list actors` (and a test) can tell this run's actors apart.
        pool_id = uuid.uuid4().hex[:8]
        self.pool = [actor_class.options(
            name=f"circuitdiff-{pool_id}-{i}", num_cpus=1, num_gpus=1 if gpus else 0,
            max_restarts=RAY_MAX_RESTARTS, max_task_retries=RAY_MAX_TASK_RETRIES).remote()
            for i in range(size)]
        self.log(f"ray: {size} actors, {'1 GPU' if gpus else '1 CPU'} each; waiting for Ray to "
                 f"place them")
        pending = {actor.describe.remote(): i for i, actor in enumerate(self.pool)}
        placed = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=PLACEMENT_LOG_S)
            for ref in ready:
                placed[pending.pop(ref)] = ray.get(ref)
            if pending:
                self.log(f"ray: {len(pending)} of {size} actors not placed yet (the cluster has "
                         f"{resources.get('GPU', 0):g} GPUs, {resources.get('CPU', 0):g} CPUs); "
                         f"they start when a node has room")
        nodes = collections.Counter(f"{p['node']} ({p['device']})" for p in placed.values())
        self.log("ray: actors on " + ", ".join(f"{n} x {node}" for node, n in nodes.items()))
        return self.pool


def _connect(address: str | None) -> tuple[Any, bool]:
    """The `ray` module, connected to the cluster at `address` (see RayExecutor), and whether this
    call connected it (so the executor disconnects at its end)."""
    try:
        import ray
    except ImportError:
        raise ExecutorUnavailableError(
            "--executor ray needs Ray, which is not installed: pip install -r requirements-ray.txt "
            "(or pip install -e '.[ray]')") from None
    if ray.is_initialized():
        return ray, False
    if address not in (None, "auto"):
        host, port = split_address(address)
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            raise ExecutorUnavailableError(
                f"cannot reach the Ray cluster at {address} ({error}); start one there with "
                f"`ray start --head` or give the head node's address (its GCS port, 6379 by "
                f"default), or --ray-address auto on a node of the cluster") from None
    try:
        ray.init(address=address)
    except ConnectionError as error:
        raise ExecutorUnavailableError(f"no Ray cluster at --ray-address {address}: {error}") from None
    return ray, True


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT" or "ray://HOST:PORT"; InputError naming the address otherwise."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"Ray address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    return host, int(port)


def make_executor(name: ExecutorName, address: str | None = None, actors: int = 0,
                  device: str = "auto", log: Callable[[str], None] = print):
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, actors, device, log)
    raise InputError(f"executor {name!r} is not one of {list(EXECUTORS)}")
