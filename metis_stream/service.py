"""The job service: what the server does with jobs, independent of HTTP.

It creates jobs, submits them without blocking the event loop, takes their
events, cancels them, and runs one monitor per cluster. The web layer is a thin
translation of routes onto these methods; a program that embeds metis-stream calls
them itself (docs/embedding.md):

    async with JobService.from_config(config) as service:
        job = await service.submit("tokens", {"text": "hello"})
        async for event in service.follow(job.id):
            ...
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

import anyio
import httpx
from anyio.abc import TaskGroup

from metis_stream import tokens
from metis_stream.backends.contract import AppendResult, Backend
from metis_stream.backends.follow import follow
from metis_stream.backoff import Backoff
from metis_stream.clusters import CLUSTER_STATES, AgentPresence
from metis_stream.config import Config
from metis_stream.deliverer import Deliverer, send
from metis_stream.errors import (
    BackendUnavailable,
    BadInput,
    Conflict,
    EmbeddingError,
    Gone,
    InvalidParams,
    JobEnded,
    JobNotFound,
    JobNotSubmitted,
    NotAllowed,
    NotFound,
    NotRunning,
    SchedulerError,
    TooManySubmissions,
    UnknownTemplate,
    plain_cause,
)
from metis_stream.events import Event, NewEvent, element_event
from metis_stream.factory import build_backend, build_schedulers
from metis_stream.job_folder import JobFolder
from metis_stream.jobs import Job, JobState, new_job_id
from metis_stream.keys import ApiKey
from metis_stream.limits import RateLimiter
from metis_stream.metrics import Metrics
from metis_stream.monitor import Monitor
from metis_stream.ndjson import NdjsonReader
from metis_stream.schedulers.base import Scheduler, Submission
from metis_stream.schedulers.dialect import END_USER, job_name
from metis_stream.shells.base import TakesLogin
from metis_stream.spool_reader import SpoolReader
from metis_stream.templates import (
    DEFAULT_STDERR_TAIL_LINES,
    Template,
    param_text,
    parse_array,
    validate_inputs,
    validate_params,
)
from metis_stream.webhooks import DeadLetter

__all__ = [
    "JobService",
]

logger = logging.getLogger(__name__)

Uploads = Callable[[JobFolder], Awaitable[None]]
"""Stores a submission's input files in its job's folder, before the job exists (the web
layer's multipart upload); on failure it leaves nothing behind and raises."""

SUBMISSION_WAIT = 30.0
"""How long a job's first event waits for the server to record the submission."""
EVERY_KEYLESS_CALLER = "*"
"""The rate limit's bucket shared by all callers of a server without API keys (no address
or key hash is spelt so)."""
NOT_RUNNING = ("the metis-stream service is not running: start it with `async with service:` "
               "or, for an app mounted in a host app (whose Mount never runs the mounted "
               "app's lifespan), with `async with metis_stream.lifespan(app):` in the host's "
               "own lifespan (docs/embedding.md)")
MAX_DEPENDENCIES = 64
"""Jobs one job may wait for (``after`` and ``after_any`` together)."""
DEPENDENCY_POLL = 0.2
"""Seconds between looks at a parent whose submission is under way."""
MAX_LOGIN_CODE = 256
"""Characters of a login code: a TOTP code has 6 to 8, a YubiKey OTP 44."""


@dataclass(frozen=True, slots=True)
class Waits:
    """The jobs a job waits for: ``after`` must complete successfully, ``after_any`` end
    however; by metis id when asked for, by scheduler id when submitted."""

    after: tuple[str, ...] = ()
    after_any: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        return self.after + self.after_any


NO_WAITS = Waits()


class JobService:
    """What the server does with jobs. ``async with`` runs it (the backend, the
    schedulers and their monitors) and closes it; the methods return typed records
    (:class:`Job`, :class:`Event`)."""

    def __init__(self, config: Config, backend: Backend,
                 schedulers: Mapping[str, Scheduler]) -> None:
        self.config = config
        self.backend = backend
        self.schedulers = schedulers
        self._tasks: TaskGroup | None = None
        self._lifetime: contextlib.AbstractAsyncContextManager[None] | None = None
        self._cancelling: set[str] = set()
        """Jobs whose cancel is under way (see cancel)."""
        self._submissions = RateLimiter(config.server.submissions_per_minute)
        self.metrics = Metrics()
        self._monitors: dict[str, Monitor] = {}

    @classmethod
    def from_config(cls, config: Config) -> JobService:
        """The service of ``config`` with the backend and the schedulers it names (Redis or
        memory; SSH, local commands or the local scheduler), as ``serve`` builds them;
        not running yet (``async with``)."""
        backend = build_backend(config)
        return cls(config, backend, build_schedulers(config, backend))

    @property
    def running(self) -> bool:
        """Whether the service has been started (``async with``, or :meth:`run`) and not
        stopped since."""
        return self._tasks is not None

    async def __aenter__(self) -> Self:
        """Start the service; it stops, its monitors first, when the block ends."""
        if self._lifetime is not None or self.running:
            raise EmbeddingError("this metis-stream service is running already: enter it once")
        lifetime = self._lifetime = self._run_for_a_while()
        try:
            await lifetime.__aenter__()
        except BaseException:
            self._lifetime = None
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, traceback: TracebackType | None) -> bool | None:
        lifetime, self._lifetime = self._lifetime, None
        assert lifetime is not None, "__aexit__ without __aenter__"
        return await lifetime.__aexit__(exc_type, exc, traceback)

    @contextlib.asynccontextmanager
    async def _run_for_a_while(self) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            await self.run(tasks)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
                self._tasks = None
                with anyio.CancelScope(shield=True):
                    await self.close()

    async def run(self, task_group: TaskGroup) -> None:
        """Start the backend, the schedulers and their monitors in ``task_group`` (what
        ``async with`` does, for a caller that keeps its own task group)."""
        await self.backend.start()
        for scheduler in self.schedulers.values():
            await scheduler.start()
            cluster = self.config.clusters[scheduler.name]
            spool = None
            if cluster.delivery != "http":
                spool = SpoolReader(self.backend, scheduler, self._ingest_spooled,
                                    self._report_spool_damage,
                                    max_bytes=cluster.spool_max_bytes,
                                    max_event_bytes=self.config.server.max_event_bytes,
                                    metrics=self.metrics)
            monitor = Monitor(self.backend, scheduler, self._append_monitor, self._tail_lines,
                              spool=spool, spool_interval=cluster.spool_interval,
                              spool_keep=cluster.spool_keep)
            for state in CLUSTER_STATES:
                self.metrics.gauge("metis_cluster_state", functools.partial(
                    _in_state, monitor, state), cluster=cluster.name, state=state)
            self._monitors[cluster.name] = monitor
            task_group.start_soon(monitor.run)
        for webhook in self.config.webhooks.values():
            task_group.start_soon(Deliverer(self.backend, webhook, self.metrics).run)
        self._tasks = task_group

    async def close(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.close()
        await self.backend.close()

    # Tokens

    def job_token(self, job_id: str) -> str:
        return tokens.job_token(self.config.server.secret, job_id)

    def watch_token(self, job_id: str) -> str:
        return tokens.watch_token(self.config.server.secret, job_id)

    def events_url(self, job_id: str) -> str:
        return self.config.server.events_url(job_id)

    # Jobs

    def template(self, name: object) -> Template:
        template = self.config.templates.get(name) if isinstance(name, str) else None
        if template is None:
            raise UnknownTemplate(str(name))
        return template

    async def submit(self, template: str, params: Mapping[str, Any] | None = None, *,
                     inputs: Sequence[str] = (), user: str | None = None,
                     owner: str = "", after: Sequence[str] = (),
                     after_any: Sequence[str] = ()) -> Job:
        """Create and submit a job from the program's own code: what ``POST /api/jobs``
        does, without HTTP and without its rate limit. The job's record comes back at
        once; its events follow (:meth:`follow`). Errors are those of the API
        (UnknownTemplate, InvalidParams, BadInput for ``user``, ...).

        ``owner``: the name of the API key whose client may see the job over HTTP as its
        own; empty, only admin keys see it. ``user``: the end user's id (:func:`end_user`).
        ``after``, ``after_any``: ids of jobs of the same cluster that must complete, or
        end however, before this one starts.
        """
        return await self._create(template, {} if params is None else params, list(inputs),
                                  owner=owner, user=user, after=list(after),
                                  after_any=list(after_any), seen_by=None)

    async def create(self, template_name: object, params: object, inputs: object, *,
                     client: str, owner: str = "", user: object = None,
                     after: object = None, after_any: object = None,
                     seen_by: ApiKey | None = None, uploads: Uploads | None = None) -> Job:
        """Validate, record the job with its ``starting`` event, and submit in the background:
        a request's submission, its values as the request gave them.

        ``client`` names who asks (an API key's hash, or an address) for the rate limit;
        ``owner`` is the name of its key, which the job keeps (metis_stream.keys); ``user``
        the end user's id that the web app may give (see :func:`end_user`); ``after`` and
        ``after_any`` the ids of jobs that ``seen_by`` sees, of the same cluster, that must
        complete (or end, however) before this one starts. ``uploads`` stores input files
        in the job's folder once the request is known to be valid and before the job is
        recorded: a failed upload leaves no job.
        """
        wait = self._submissions.acquire(self._rate_limit_keys(client), time.monotonic())
        if wait:
            raise TooManySubmissions(wait)
        return await self._create(template_name, params, inputs, owner=owner, user=user,
                                  after=after, after_any=after_any, seen_by=seen_by,
                                  uploads=uploads)

    async def _create(self, template_name: object, params: object, inputs: object, *,
                      owner: str, user: object, after: object, after_any: object,
                      seen_by: ApiKey | None, uploads: Uploads | None = None) -> Job:
        tasks = self._tasks
        if tasks is None:
            raise NotRunning(NOT_RUNNING)
        template = self.template(template_name)
        values = validate_params(template, params)
        urls = validate_inputs(template, inputs)
        label = end_user(user)
        waits = Waits(dependency_ids(after, "after"), dependency_ids(after_any, "after_any"))
        await self._check_dependencies(template, waits, seen_by)
        scheduler = self.schedulers[template.cluster]
        if isinstance(scheduler, TakesLogin) and (needed := scheduler.needs_login()) is not None:
            # Refused before anything is recorded: the submission could only fail.
            raise needed
        now = time.time()
        job_id = new_job_id(now)
        if uploads is not None:
            if not template.accepts_inputs:
                raise InvalidParams({"files": f"template {template.name!r} takes no inputs"})
            await uploads(self.schedulers[template.cluster].job_folder(job_id))
        array = template.array_for(values)
        job = Job(id=job_id, template=template.name, cluster=template.cluster,
                  params=dict(values), inputs=urls, owner=owner, user=label, created=now,
                  updated=now, array=None if array is None else str(array))
        await self.backend.create_job(job)
        self.metrics.count("metis_jobs_created_total")
        await self._append(job.id, [NewEvent("starting", {"template": template.name})],
                           by="server")
        tasks.start_soon(self._submit, job, template, waits)
        return await self.backend.get_job(job.id)

    async def _check_dependencies(self, template: Template, waits: Waits,
                                  seen_by: ApiKey | None) -> None:
        """Refuse, before anything is recorded, a dependency on a job that ``seen_by`` does
        not see (404, as for any job it does not see) or on another cluster's job."""
        if not waits.all:
            return
        if self.config.clusters[template.cluster].scheduler == "local":
            raise BadInput(f"cluster {template.cluster!r} runs jobs on this machine, without "
                           "a batch system: 'after' and 'after_any' need a batch cluster")
        if len(waits.all) > MAX_DEPENDENCIES:
            raise BadInput(f"a job may wait for at most {MAX_DEPENDENCIES} jobs")
        for job_id in waits.all:
            parent = await self.get(job_id, seen_by=seen_by)
            if parent.cluster != template.cluster:
                raise BadInput(f"job {job_id} runs on cluster {parent.cluster!r}, template "
                               f"{template.name!r} on {template.cluster!r}: a job can wait "
                               "only for jobs of its own cluster")

    async def _scheduler_waits(self, job_id: str, waits: Waits) -> Waits | None:
        """The scheduler ids that ``job_id`` waits for (``waits`` names its parents by
        metis id), once each parent is on the cluster. A parent that has ended counts as
        met (the scheduler may have forgotten it), or, for ``after`` when it did not
        complete, as never met: then ``job_id`` ends here, and None comes back."""
        ids: dict[str, list[str]] = {"after": [], "after_any": []}
        for kind, parents in (("after", waits.after), ("after_any", waits.after_any)):
            for parent_id in parents:
                parent = await self._submitted(parent_id)
                if not parent.state.terminal and parent.scheduler_id is not None:
                    ids[kind].append(parent.scheduler_id)
                elif kind == "after" and parent.state != JobState.COMPLETED:
                    how = "was cancelled" if parent.state == JobState.CANCELLED else "failed"
                    with contextlib.suppress(JobEnded):
                        await self._append(job_id, [NewEvent("fatal", {
                            "error": f"will never run: job {parent_id} it depends on {how}"})],
                            by="server")
                    return None
        return Waits(tuple(ids["after"]), tuple(ids["after_any"]))

    async def _submitted(self, job_id: str) -> Job:
        """The job once it is on the cluster (it has a scheduler id) or has ended: a job
        submitted right after its parent may find the parent's submission under way."""
        while True:
            job = await self.backend.get_job(job_id)
            if job.scheduler_id is not None or job.state.terminal:
                return job
            await anyio.sleep(DEPENDENCY_POLL)

    def _rate_limit_keys(self, client: str) -> tuple[str, ...]:
        """The buckets a submission takes from. Callers of a keyless server also share one:
        any local process can pick its source address among all of 127/8, so buckets per
        address alone bound nothing."""
        if self.config.server.keyring:
            return (client,)
        return (client, EVERY_KEYLESS_CALLER)

    def spec(self, job: Job) -> dict[str, Any]:
        return {"job": job.id, "template": job.template, "params": job.params,
                "inputs": job.inputs}

    async def _submit(self, job: Job, template: Template, waits: Waits = NO_WAITS) -> None:
        scheduler = self.schedulers[template.cluster]
        env = {"METIS_JOB_ID": job.id, "METIS_EVENTS_URL": self.events_url(job.id),
               "METIS_DELIVERY": self.config.clusters[template.cluster].delivery}
        for name, value in job.params.items():
            env[template.params[name].env_name()] = param_text(value)
        array = template.array_for(job.params)
        element_tokens: dict[int, str] = {}
        if array is not None:
            # One spool per job, and an array's elements are many writers of their own
            # folders: they post over HTTP (docs/arrays.md).
            env["METIS_DELIVERY"] = "http"
            secret = self.config.server.secret
            element_tokens = {i: tokens.element_token(secret, job.id, i) for i in array.indices}
        try:
            with anyio.fail_after(self.config.server.submit_timeout):
                on_cluster = await self._scheduler_waits(job.id, waits)
            if on_cluster is None:
                return
            submission = Submission(job_id=job.id, name=job_name(job.id, job.user),
                                    template=template, env=env, token=self.job_token(job.id),
                                    spec=self.spec(job), user=job.user,
                                    after=on_cluster.after, after_any=on_cluster.after_any,
                                    array=array, element_tokens=element_tokens)
            with anyio.fail_after(self.config.server.submit_timeout):
                scheduler_id = await scheduler.submit(submission)
        except Exception as exc:  # any failure must end the job, never the server
            await self._submission_failed(job.id, exc)
            return
        await self._record_submission(job.id, scheduler, scheduler_id)

    async def _submission_failed(self, job_id: str, exc: Exception) -> None:
        """End the job with its failure: the message names SSH users, hosts, ports, paths
        and host key fingerprints, so it goes to the log and to the job's record for API
        key holders; the ``fatal`` event, which watchers read, says the plain cause and a
        reference to the log line."""
        reference = secrets.token_hex(4)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        logger.warning("job %s: submission failed (reference %s): %s", job_id, reference,
                       detail)
        self.metrics.count("metis_submissions_failed_total")
        await self.backend.set_error_detail(job_id, detail)
        error = f"submission failed: {plain_cause(exc)} (reference {reference})"
        with contextlib.suppress(JobEnded):
            await self._append(job_id, [NewEvent(
                "fatal", {"error": error, "reference": reference})], by="server")

    async def _record_submission(self, job_id: str, scheduler: Scheduler,
                                 scheduler_id: str) -> None:
        """Append ``submitted``, riding out a short backend outage: the job now exists on
        the cluster, and without its scheduler id the monitor could never find it."""
        backoff = Backoff(base=0.1, cap=5.0)
        while True:
            try:
                await self._append(job_id, [NewEvent("submitted", scheduler_id)], by="server")
                return
            except JobEnded:
                # Cancelled while it was being submitted: the scheduler must forget it too,
                # and the token written during the submission must go.
                await scheduler.cancel(scheduler_id)
                await self._release(job_id)
                return
            except BackendUnavailable:
                delay = backoff.next_delay()
                logger.warning("job %s: backend unavailable, retrying in %.1fs", job_id, delay)
                await anyio.sleep(delay)

    async def ingest(self, job_id: str, events: Sequence[NewEvent], *,
                     element: int | None = None) -> AppendResult:
        """Append events that the job itself posted (``element``: that array element, whose
        token it used).

        A job can start before its scheduler's submit command has returned; its events
        then wait for the ``submitted`` event, so that watchers always see it first.
        """
        if not events:
            raise BadInput("no events in the request")
        if element is not None:
            await self._check_element(job_id, element)
            events = [element_event(event, element) for event in events]
        result = await self._append_job_events(job_id, events)
        await self._appended(job_id, result, by="job", path="http")
        return result

    async def _check_element(self, job_id: str, element: int) -> None:
        """An element's token fits only its own array's indices (a token alone never tells
        whether the job exists: this runs after the token was checked)."""
        job = await self.backend.get_job(job_id)
        if job.array is None or element not in parse_array(job.array).indices:
            raise NotAllowed(f"job {job_id} has no array element {element}")

    async def _ingest_spooled(self, job_id: str, events: Sequence[NewEvent]) -> AppendResult:
        """Append events read from the job's spool, as the job's own (docs/spool.md)."""
        spooled = [replace(event, via="spool") for event in events]
        result = await self.backend.append(job_id, spooled, from_job=True)
        await self._appended(job_id, result, by="job", path="spool")
        return result

    async def _report_spool_damage(self, job_id: str, notes: list[str]) -> None:
        """Tell the job's watchers what of its spool was skipped, as a notice."""
        with contextlib.suppress(JobEnded):
            await self._append(job_id, [NewEvent("log", {
                "stream": "notice", "lines": [f"spool: {note}" for note in notes],
                "source": "spool"})], by="server")

    async def _append_job_events(self, job_id: str, events: Sequence[NewEvent]) -> AppendResult:
        try:
            return await self.backend.append(job_id, events, from_job=True)
        except JobNotSubmitted:
            pass
        async with self.backend.subscribe(job_id) as live:
            with anyio.move_on_after(SUBMISSION_WAIT):
                while True:
                    try:
                        return await self.backend.append(job_id, events, from_job=True)
                    except JobNotSubmitted:
                        await live.next()
        raise BackendUnavailable(f"job {job_id} is still being submitted; retry")

    async def cancel(self, job_id: str, *, seen_by: ApiKey | None) -> Job:
        """Cancel a job that ``seen_by`` sees (:meth:`get`): the scheduler's job, then a
        ``cancelled`` event."""
        job = await self.get(job_id, seen_by=seen_by)
        if job.state.terminal:
            raise JobEnded(job_id)
        # The job dies before `cancelled` is appended: meanwhile the monitor, which would
        # take the death for the job's own failure, leaves it to this cancel.
        self._cancelling.add(job_id)
        try:
            if job.scheduler_id is not None:
                await self.schedulers[job.cluster].cancel(job.scheduler_id)
            await self._append(job_id, [NewEvent("cancelled", {"error": "cancelled"})],
                               by="client")
        finally:
            self._cancelling.discard(job_id)
        return await self.backend.get_job(job_id)

    async def ingest_ndjson(self, job_id: str, chunks: AsyncIterable[bytes], *,
                            whole: bool, element: int | None = None) -> AppendResult:
        """Append the events of an NDJSON body that a job posted.

        A ``whole`` body (one whose length was announced) is all or nothing. A streamed
        one is appended as its chunks arrive, so that watchers see a piped program's
        output live; a bad line ends it, what came before stays appended (watchers may
        have seen it), and the error's ``seqs`` say what that was.
        """
        server = self.config.server
        reader = NdjsonReader(max_event_bytes=server.max_event_bytes,
                              max_lines=server.max_lines_per_request)
        appended: list[Event] = []
        seqs: list[int] = []

        async def take() -> None:
            events = reader.events_received()
            if events and not (whole and reader.error):
                result = await self.ingest(job_id, events, element=element)
                appended.extend(result.events)
                seqs.extend(result.seqs)
            if reader.error is not None:
                if not whole:
                    reader.error.details["seqs"] = seqs
                raise reader.error

        async for chunk in chunks:
            reader.feed(chunk)
            if not whole:
                await take()
        reader.feed_eof()
        await take()
        if not seqs:
            raise BadInput("no events in the request")
        return AppendResult(events=appended, seqs=seqs)

    # Clusters

    async def login(self, cluster: str, code: str) -> bool:
        """Log the server in to ``cluster``, whose login node asks for a second factor,
        with ``code``, a one-time code an operator typed (docs/login.md): True when the
        connection opened, False when one was open already (the code unused). The code is
        used once, and kept and logged nowhere. LoginRefused when the cluster refuses it.
        """
        if cluster not in self.schedulers:
            raise NotFound(f"no cluster named {cluster[:64]!r}")
        scheduler = self.schedulers[cluster]
        if not isinstance(scheduler, TakesLogin):
            raise Conflict(f"cluster {cluster} runs jobs on this machine: there is nothing to "
                           "log in to")
        opened = await scheduler.login(code)
        logger.info("cluster %s: %s", cluster, "logged in by an operator" if opened
                    else "a login came while the connection was open (its code was not used)")
        monitor = self._monitors.get(cluster)
        if monitor is not None:
            await monitor.check_login()
        return opened

    async def clusters(self) -> list[dict[str, Any]]:
        """Each cluster's configuration that clients may see, and its health as the
        process that polls it last wrote it: ``unknown`` before any poll (a cluster
        without live jobs is not polled)."""
        health = await self.backend.cluster_health()
        agents = await self.backend.agent_presence()
        now = time.time()
        views = []
        for name, cluster in self.config.clusters.items():
            seen = health.get(name)
            view = {"name": name, "scheduler": cluster.scheduler,
                    "delivery": cluster.delivery, "link": cluster.link,
                    **(seen.as_json() if seen is not None else {
                        "state": "unknown", "since": None, "last_error": "",
                        "checked": None, "flavour": "", "version": ""})}
            if cluster.link == "agent":
                view["agent"] = agents.get(name, AgentPresence(name)).view(now)
            views.append(view)
        return views

    async def get(self, job_id: str, *, seen_by: ApiKey | None) -> Job:
        """The job's record, if ``seen_by`` sees it: another key's job raises JobNotFound,
        the answer for a job that does not exist, so that a key learns nothing of the jobs
        it does not see. None: a caller that proved its right to this one job otherwise
        (its watch token, its job token), or the program's own code."""
        job = await self.backend.get_job(job_id)
        if seen_by is not None and not seen_by.sees(job.owner):
            raise JobNotFound(job_id)
        return job

    async def jobs(self, *, seen_by: ApiKey | None, states: Collection[JobState] | None = None,
                   user: object = None, limit: int = 100) -> list[Job]:
        """The jobs ``seen_by`` sees (None: every job, for the program's own code), newest
        first; with ``user``, only that end user's."""
        owner = None if seen_by is None else seen_by.owner_filter
        return await self.backend.list_jobs(states=states, owner=owner,
                                            user=None if user is None else end_user(user),
                                            limit=limit)

    async def history(self, job_id: str, after: int = 0) -> list[Event]:
        """One page of a job's events with seq > ``after``."""
        return await self.backend.read(job_id, after)

    def follow(self, job_id: str, after: int = 0) -> AsyncIterator[Event]:
        """The job's events with seq > ``after``, history then live, ending after its
        terminal event (``completed``, ``fatal`` or ``cancelled``)."""
        return follow(self.backend, job_id, after)

    # Webhooks

    async def failed_webhooks(self) -> list[DeadLetter]:
        """Every webhook's dead letters, oldest first."""
        return await self.backend.dead_letters()

    async def replay_webhook(self, letter_id: str) -> DeadLetter:
        """Send a dead letter's event once more, now, and forget the letter once it arrived;
        WebhookFailed (the letter stays) when it did not. A replay comes after the job's later
        events: the receiver orders by the event's seq, and drops a repeated webhook-id."""
        letter = next((letter for letter in await self.backend.dead_letters()
                       if letter.id == letter_id), None)
        if letter is None:
            raise NotFound(f"no dead letter {letter_id[:200]!r}: `metis-stream webhooks failed` "
                           "lists them")
        webhook = self.config.webhooks.get(letter.webhook)
        if webhook is None:
            raise NotFound(f"webhook {letter.webhook} is no longer configured: add its "
                           f"[webhooks.{letter.webhook}] table again to replay its letters")
        try:
            job = await self.backend.get_job(letter.job)
            events = await self.backend.read(letter.job, letter.seq - 1, limit=1)
        except JobNotFound:
            events = []
        if not events or events[0].seq != letter.seq:
            await self.backend.remove_dead_letter(letter_id)
            raise Gone(f"job {letter.job} and its events are no longer kept (event_retention): "
                       "the dead letter cannot be replayed, and was removed")
        async with httpx.AsyncClient(follow_redirects=False) as client:
            await send(client, webhook, job, events[0])
        self.metrics.count("metis_webhook_delivered_total", webhook=webhook.name)
        return await self.backend.remove_dead_letter(letter_id)

    # Files

    def job_folder(self, job: Job) -> JobFolder:
        """The job's folder on its cluster (metis_stream.job_folder)."""
        return self.schedulers[job.cluster].job_folder(job.id)

    def is_output(self, job: Job) -> Callable[[str], bool]:
        """Whether a path in the job's folder is one of its template's outputs."""
        template = self.config.templates.get(job.template)
        return template.is_output if template is not None else lambda path: False

    def _tail_lines(self, job: Job) -> int:
        template = self.config.templates.get(job.template)
        return template.stderr_tail_lines if template else DEFAULT_STDERR_TAIL_LINES

    async def _append_monitor(self, job_id: str, events: list[NewEvent]) -> None:
        if job_id in self._cancelling:
            return  # killed by a cancel that is about to say so
        await self._append(job_id, events, by="monitor")

    async def _append(self, job_id: str, events: Sequence[NewEvent], *, by: str) -> None:
        """Append events of the server's own (``by`` says which part of it)."""
        await self._appended(job_id, await self.backend.append(job_id, events), by=by)

    async def _appended(self, job_id: str, result: AppendResult, *, by: str,
                        **labels: str) -> None:
        """Count what was appended; once the job has ended, remove its token file."""
        if not result.events:
            return
        self.metrics.count("metis_events_appended_total", len(result.events), by=by, **labels)
        final = result.events[-1]
        if final.terminal:
            self.metrics.count("metis_jobs_ended_total", type=final.type)
            await self._release(job_id)

    async def _release(self, job_id: str) -> None:
        job = await self.backend.get_job(job_id)
        keep_spool = self.config.clusters[job.cluster].spool_keep > 0
        try:
            await self.schedulers[job.cluster].release(job_id, keep_spool=keep_spool)
        except (SchedulerError, OSError) as exc:
            logger.warning("job %s: could not remove its token file: %s", job_id, exc)



def dependency_ids(value: object, name: str) -> tuple[str, ...]:
    """A request's ``after`` or ``after_any``: a list of job ids, or BadInput."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise BadInput(f"'{name}' must be a list of job ids")
    if len(value) > MAX_DEPENDENCIES:
        raise BadInput(f"'{name}' may name at most {MAX_DEPENDENCIES} jobs")
    return tuple(dict.fromkeys(value))


def end_user(user: object) -> str | None:
    """An end user's id as a web app gives it, or BadInput that says what it may be: the id
    goes to the cluster in the job's name (schedulers.dialect.END_USER)."""
    if user is None:
        return None
    if not isinstance(user, str) or not END_USER.match(user):
        raise BadInput("'user' must be 1 to 64 letters, digits, _ or -: the end user's id in "
                       "your app, which the cluster shows in the job's name (an opaque id, "
                       "not an email address or a name)")
    return user


def login_code(value: object) -> str:
    """A login request's code, or BadInput that says what it may be."""
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_LOGIN_CODE
            or not value.isprintable() or value != value.strip()):
        raise BadInput(f"'code' must be the one-time code as text: 1 to {MAX_LOGIN_CODE} "
                       "printable characters, without spaces around them")
    return value


def _in_state(monitor: Monitor, state: str) -> float:
    """1 when the cluster is in ``state`` as this process's monitor saw it last, else 0."""
    health = monitor.health()
    return 1.0 if health is not None and health.state == state else 0.0
