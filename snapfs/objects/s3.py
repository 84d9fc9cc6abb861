"""A region's objects in an S3-compatible bucket (AWS S3, Ceph RGW, MinIO, rclone serve s3).

`S3Backend` has the interface of `LocalBackend` (put/get/exists/delete/keys/sync/destroy) over
one key prefix of a bucket, so a region swaps one for the other. A PUT that returned is
durable (S3's contract), so `sync()` has nothing to do and the region's order "object stored
-> index row committed" holds as it is: nothing is recorded before the server said it has it.

Why boto3: it is the maintained S3 client, speaks every S3-compatible server (path-style
addressing for the self-hosted ones), and takes credentials the way every AWS tool does
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/credentials, instance
roles). Credentials are never stored by snapfs: the catalogue keeps only the bucket, prefix
and endpoint. Its calls block, so callers run them in worker threads (`trio.to_thread`); a
client is thread-safe and keeps a pool of connections, one per concurrent transfer.

Retries are ours, not botocore's, so that each one is logged (WARNING, with the reason) and
so that they can go on while a server is down: transient failures (connection refused or
reset, timeouts, 5xx, throttling) are retried with capped exponential backoff and jitter,
each attempt bounded by the client's timeouts, for at most `max_wait` seconds in total
(None: until the server answers; copy jobs then pause and resume, their progress unchanged).
`interrupt()` ends every waiting retry at once (unmount must not wait for a dead server).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from snapfs.errors import (
    BackendDenied,
    BackendUnavailable,
    InvalidParameter,
    NoSuchBucket,
    ObjectStoreError,
    SnapfsError,
)
from snapfs.objects.protocol import Buffers, joined

if TYPE_CHECKING:
    from snapfs.objects.protocol import ObjectStore

log = logging.getLogger(__name__)

# BackendUnavailable and BackendDenied live in snapfs.errors; callers may import them from here
# too.

T = TypeVar("T")

BACKOFF_FIRST = 0.25  # seconds before the first retry
BACKOFF_MAX = 5.0  # the longest pause between two attempts
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
MAX_CONNECTIONS = 32  # >= every concurrent transfer of the process, so none waits for a socket
DELETE_BATCH = 1000  # S3's DeleteObjects limit
# Error codes that mean "try again later", whatever the HTTP status says.
TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "OperationAborted",
    }
)
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


@dataclass(frozen=True)
class S3Location:
    """Where a region lives: `s3://BUCKET[/PREFIX]` and the server's endpoint (None: AWS)."""

    bucket: str
    prefix: str  # "" or ending in "/"
    endpoint: str | None = None

    @classmethod
    def parse(cls, url: str, endpoint: str | None = None) -> S3Location:
        if not url.startswith("s3://"):
            raise InvalidParameter(f"a backend is s3://BUCKET[/PREFIX], got {url!r}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        prefix = prefix.strip("/")
        if not 3 <= len(bucket) <= 63 or not all(c.isalnum() or c in ".-" for c in bucket):
            raise InvalidParameter(f"{bucket!r} is not an S3 bucket name")
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise InvalidParameter(f"an endpoint is an http(s) URL, got {endpoint!r}")
        return cls(bucket, f"{prefix}/" if prefix else "", endpoint or None)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def __str__(self) -> str:
        return self.url + (f" at {self.endpoint}" if self.endpoint else "")


def make_client(location: S3Location) -> Any:
    """A boto3 S3 client with the standard credential chain and our timeouts; boto's own
    retries are off (see the module doc)."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"total_max_attempts": 1},
        max_pool_connections=MAX_CONNECTIONS,
        # Ranged GETs of packs: some servers (rclone) send the whole object's checksum with
        # a part of it, which botocore would check and fail; our own formats verify every
        # block (its id or AEAD), so replies are checked only where the server requires it.
        # Uploads still carry a checksum the server verifies.
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"} if location.endpoint else {},
    )
    session = boto3.session.Session()
    region = session.region_name or "us-east-1"
    return session.client("s3", endpoint_url=location.endpoint, region_name=region, config=config)


def _is_missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and (
        exc.response.get("Error", {}).get("Code") in MISSING_CODES
    )


class _ShortRead(Exception):
    """A ranged GET answered with fewer bytes than asked: a cut connection, retried."""


def _transient(exc: Exception) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        ReadTimeoutError,
    )

    if isinstance(exc, ConnectionError | HTTPClientError | ReadTimeoutError):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in TRANSIENT_CODES or status >= 500
    return False


class S3Backend:
    """Objects under `location.prefix + subdir` of a bucket; keys are relative to that."""

    remote = True

    def __init__(
        self,
        location: S3Location,
        subdir: str = "",
        *,
        client: Any | None = None,
        max_wait: float | None = None,
        interrupted: threading.Event | None = None,
    ):
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix + subdir
        self.client = client if client is not None else make_client(location)
        self.max_wait = max_wait
        self._interrupted = interrupted if interrupted is not None else threading.Event()

    def sibling(self, subdir: str) -> S3Backend:
        """Another prefix of the same region, sharing the client and the interrupt."""
        return S3Backend(
            self.location,
            subdir,
            client=self.client,
            max_wait=self.max_wait,
            interrupted=self._interrupted,
        )

    def interrupt(self) -> None:
        """End every retry loop now (and refuse new calls): the mount is stopping."""
        self._interrupted.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    # --- the retry loop ----------------------------------------------------------------------

    def _call(self, what: str, key: str, call: Callable[[], T]) -> T:
        started = time.monotonic()
        delay = BACKOFF_FIRST
        attempt = 0
        while True:
            if self._interrupted.is_set():
                raise BackendUnavailable(f"{what} {self._where(key)} interrupted: snapfs stops")
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - classified below
                if _is_missing(exc):
                    raise FileNotFoundError(self._where(key)) from None
                if not _transient(exc):
                    raise self._permanent(what, key, exc) from exc
                attempt += 1
                waited = time.monotonic() - started
                if self.max_wait is not None and waited + delay > self.max_wait:
                    raise BackendUnavailable(
                        f"{what} {self._where(key)} failed for {waited:.0f} s: {exc}"
                    ) from exc
                log.warning(
                    "S3 %s %s failed (%s); retry %d in %.1f s",
                    what,
                    self._where(key),
                    exc,
                    attempt,
                    delay,
                )
                self._interrupted.wait(delay)
                delay = min(BACKOFF_MAX, delay * 2) * random.uniform(0.8, 1.2)

    def _permanent(self, what: str, key: str, exc: Exception) -> SnapfsError:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return BackendDenied(
                f"no S3 credentials for {self.location}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (~/.aws/credentials)"
            )
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return BackendDenied(f"{what} {self._where(key)}: {code}")
            if code == "NoSuchBucket":
                return NoSuchBucket(f"bucket {self.bucket} does not exist ({self.location})")
        return ObjectStoreError(f"{what} {self._where(key)} failed: {exc}")

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    # --- the backend interface ---------------------------------------------------------------

    def put(self, key: str, data: Buffers) -> None:
        """Durable when it returns (S3 acknowledges a PUT only once it has the object)."""
        data = joined(data)
        self._call(
            "PUT",
            key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data),
        )

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""

        def fetch() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return response["Body"].read()  # inside the retry: a body cut short is retried

        return self._call("GET", key, fetch)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes of the object from `offset` (one ranged GET); FileNotFoundError if
        there is no object. A reply of another length is retried, then refused."""

        def fetch() -> bytes:
            response = self.client.get_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                Range=f"bytes={offset}-{offset + length - 1}",
            )
            data = response["Body"].read()
            if len(data) != length:
                raise _ShortRead(f"{len(data)} of {length} bytes at {offset}")
            return data

        return self._call("GET", key, fetch)

    def get_tail(self, key: str, length: int) -> bytes:
        """The last `length` bytes of the object (all of it if shorter): a suffix GET."""

        from botocore.exceptions import ClientError

        def fetch() -> bytes:
            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=self.prefix + key, Range=f"bytes=-{length}"
                )
            except ClientError as exc:
                # S3 answers a suffix longer than the object with all of it; some servers
                # (rclone) refuse it instead.
                if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                    raise
                response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return response["Body"].read()

        return self._call("GET", key, fetch)

    def listing(self) -> Iterator[dict[str, Any]]:
        """Every object under the prefix as LIST gives it (Key, Size, ETag, LastModified),
        page by page."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("LIST", "", functools.partial(self.client.list_objects_v2, **kwargs))
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def sized_keys(self) -> Iterator[tuple[str, int]]:
        """Every object key under the prefix (relative to it) with its size."""
        for item in self.listing():
            yield item["Key"][len(self.prefix) :], int(item["Size"])

    def exists(self, key: str) -> bool:
        try:
            self._call(
                "HEAD",
                key,
                lambda: self.client.head_object(Bucket=self.bucket, Key=self.prefix + key),
            )
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call(
            "DELETE",
            key,
            lambda: self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key),
        )

    def delete_many(self, keys: Sequence[str], each: Callable[[], None] | None = None) -> None:
        """Delete in batches of DELETE_BATCH; `each` is called after every object is gone
        (a fault point for the crash tests)."""
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": self.prefix + k} for k in keys[start : start + DELETE_BATCH]]
            self._call(
                "DELETE",
                f"({len(batch)} objects)",
                functools.partial(
                    self.client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": batch, "Quiet": True},
                ),
            )
            if each is not None:
                for _ in batch:
                    each()

    def keys(self) -> Iterator[str]:
        """Every object key under the prefix (relative to it), page by page."""
        for key, _ in self.sized_keys():
            yield key

    def sync(self) -> None:
        """Nothing to do: every put was durable when it returned."""

    def reclaim_unmapped(self) -> int:
        """Nothing to reclaim: a put that did not return left no partial object."""
        return 0

    def close(self) -> None:
        """Connections are the client's pool's; nothing to close."""

    def destroy(self) -> None:
        """Delete every object under the prefix (the region is being removed)."""
        self.delete_many(list(self.keys()))

    # --- the bucket --------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (self-hosted servers start empty)."""
        try:
            self._call("HEAD", "", lambda: self.client.head_bucket(Bucket=self.bucket))
            return
        except FileNotFoundError:
            pass
        self._call("CREATE BUCKET", "", lambda: self.client.create_bucket(Bucket=self.bucket))
        log.info("created bucket %s", self.bucket)


if TYPE_CHECKING:
    _conforms: type[ObjectStore] = S3Backend  # mypy checks that S3Backend is an ObjectStore
