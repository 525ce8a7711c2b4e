"""Downloads through ObjectStore against a real S3 server with injected
faults: parallel ranges that fail, the retry deadline, stalls, and the
bucket check at open."""

from __future__ import annotations

import os
import sys
import threading
import time
import zlib

import pytest

import s3env
from faultserver import Faults, faulty_s3
from zodb_s3blobs.errors import ChecksumMismatch, ObjectStoreError
from zodb_s3blobs.objectstore import CHECKSUM_METADATA, ObjectStore
from zodb_s3blobs.settings import MiB

PART = 5 * MiB  # the smallest part size: many ranges from a modest object


def put_object(key: str, data: bytes) -> None:
    """Store *data* under *key* with its CRC32 recorded, as uploads do."""
    s3env.server().client().put_object(
        Bucket=s3env.BUCKET,
        Key=key,
        Body=data,
        Metadata={CHECKSUM_METADATA: f"{zlib.crc32(data):08x}"},
    )


def ranged_store(endpoint_url: str, **kw) -> ObjectStore:
    """An ObjectStore that always switches to parallel ranges after the first
    part (as over a WAN), however fast loopback is."""
    store = ObjectStore(s3env.settings(endpoint_url=endpoint_url, part_size=PART, **kw))
    store.fast_stream = float("inf")
    return store


def running_range_fetches() -> int:
    """How many threads are inside ObjectStore._fetch_range right now."""
    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "_fetch_range":
                count += 1
                break
            frame = frame.f_back
    return count


def one_range_fails(failing: str, others_delay: float, times: int = 1_000):
    """A Faults ``when`` condition: the GET of range *failing* is answered 500
    (with ``range_error_rate=1``) the first *times* times; every other ranged
    GET is held back *others_delay* seconds, so it is still running when the
    failure arrives, and then served."""
    lock = threading.Lock()
    failed = [0]

    def when(environ) -> bool:
        header = environ.get("HTTP_RANGE")
        if header == failing:
            with lock:
                if failed[0] < times:
                    failed[0] += 1
                    return True
            return False
        if header:
            time.sleep(others_delay)
        return False

    return when


def test_a_failed_range_leaves_no_worker_writing_into_reused_files(tmp_path):
    """Fails before the fix: when one ranged GET failed, the others kept
    running and wrote through the raw fd number of the download's file after
    the caller had closed it; the next file opened got that number and
    received megabytes of blob bytes.

    ``download_max_attempts=1``: this test is about what one failed attempt
    leaves behind, not about retrying it."""
    data = os.urandom(30 * MiB)
    key = f"{s3env.new_prefix()}/blobs/big.blob"
    put_object(key, data)
    failing = f"bytes={2 * PART}-{3 * PART - 1}"
    faults = Faults(range_error_rate=1.0, when=one_range_fails(failing, 1.5))
    with faulty_s3(faults) as server:
        store = ranged_store(server.endpoint_url, download_max_attempts=1)
        try:
            target = tmp_path / "download"
            with open(target, "wb") as out, pytest.raises(ObjectStoreError) as info:
                store.download(key, out)
            assert "500" in str(info.value) or "InternalError" in str(info.value)
            assert running_range_fetches() == 0, "no range worker outlives it"
            # The cache closes and removes the temp file; the process then
            # opens other files, which reuse the freed descriptor numbers.
            os.remove(target)
            unrelated = tmp_path / "unrelated"
            with open(unrelated, "wb") as other:
                other.write(b"mine")
                other.flush()
                time.sleep(3)  # longer than the held-back ranges take
            assert unrelated.read_bytes() == b"mine"
        finally:
            store.close()
    assert any(failing in note for note in faults.injected)


def test_a_retry_after_a_failed_range_writes_the_right_bytes(tmp_path):
    """One range fails on the first attempt while the others are still
    running; the retry must produce exactly the object's bytes, with no
    worker of the first attempt writing into the file the retry refills."""
    data = os.urandom(30 * MiB)
    key = f"{s3env.new_prefix()}/blobs/retried.blob"
    put_object(key, data)
    failing = f"bytes={3 * PART}-{4 * PART - 1}"
    faults = Faults(range_error_rate=1.0, when=one_range_fails(failing, 1.0, 1))
    with faulty_s3(faults) as server:
        store = ranged_store(server.endpoint_url)
        try:
            target = tmp_path / "download"
            with open(target, "wb") as out:
                assert store.download(key, out) == len(data)
            assert running_range_fetches() == 0
            assert target.read_bytes() == data
        finally:
            store.close()
    assert sum(failing in note for note in faults.injected) == 1


def test_a_ranged_download_checks_its_crc32_without_reading_the_file_back(tmp_path):
    """Fails before the fix: after switching to parallel ranges, the download
    read the whole file again to compute its CRC32 (a second pass over every
    byte); now each range's CRC32 is computed as it streams and the results
    combined. The file here is open for writing only, through a descriptor
    (no name to open it again by): any read of it fails."""
    data = os.urandom(3 * PART + 12_345)  # a last range of odd length
    key = f"{s3env.new_prefix()}/blobs/ranged.blob"
    put_object(key, data)
    store = ranged_store(s3env.server().endpoint_url)
    ranges = []
    store.clients[1].meta.events.register(
        "before-parameter-build.s3.GetObject",
        lambda params, **kw: ranges.append(params.get("Range")),
    )
    target = tmp_path / "download"
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as out:
            assert store.download(key, out) == len(data)
    finally:
        store.close()
    assert len([r for r in ranges if r]) == 3  # the ranged path was taken
    assert target.read_bytes() == data


def test_a_short_write_of_a_range_is_not_passed_by_the_checksum(tmp_path, monkeypatch):
    """Fails on the current code: ``os.pwrite`` may write fewer bytes than it
    was given (POSIX allows it: a disk that fills, a quota, a network or FUSE
    file system), and ``_fetch_range`` ignores its answer, counting and
    CRC-ing the whole chunk. The combined CRC32 then covers bytes that are
    not on disk, so the download passes a file with a hole of zeros. Before
    the CRC32 was computed from the ranges, the file was read back and the
    mismatch caught (and fetched again)."""
    data = os.urandom(3 * PART + 777)
    key = f"{s3env.new_prefix()}/blobs/short-write.blob"
    put_object(key, data)
    real_pwrite, shortened = os.pwrite, []

    def pwrite(fd: int, chunk, offset: int) -> int:
        if offset == 2 * PART and not shortened:  # once: the third range's first chunk
            shortened.append(offset)
            return real_pwrite(fd, bytes(chunk)[: len(chunk) // 2], offset)
        return real_pwrite(fd, chunk, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    store = ranged_store(s3env.server().endpoint_url)
    target = tmp_path / "download"
    try:
        with open(target, "wb") as out:
            try:
                store.download(key, out)
            except ObjectStoreError:
                pass  # refusing the bytes is right too; passing them is not
            else:
                out.flush()
                assert target.read_bytes() == data, "a hole passed the CRC32"
    finally:
        store.close()
    assert shortened == [2 * PART]


def corrupted_range_download(tmp_path, times: int) -> tuple[bytes, Faults, object]:
    """Download an object of four parts through ranges, one range of which
    the server corrupts (one byte flipped) the first *times* times; return
    the object's bytes, the faults, and what the download returned or raised."""
    data = os.urandom(3 * PART + 777)
    key = f"{s3env.new_prefix()}/blobs/corrupted.blob"
    put_object(key, data)
    corrupted = f"bytes={2 * PART}-{3 * PART - 1}"
    faults = Faults(corrupt_rate=1.0, when=one_range_fails(corrupted, 0.0, times))
    with faulty_s3(faults) as server:
        store = ranged_store(server.endpoint_url)
        try:
            with open(tmp_path / "download", "wb") as out:
                try:
                    result: object = store.download(key, out)
                except ObjectStoreError as exc:
                    result = exc
        finally:
            store.close()
    assert any(corrupted in note for note in faults.injected)
    return data, faults, result


def test_a_corrupted_range_fails_the_checksum_and_is_fetched_again(tmp_path):
    """One byte flipped in one range (the others intact) is caught by the
    combined CRC32; the download starts again and gets the right bytes."""
    data, faults, result = corrupted_range_download(tmp_path, times=1)
    assert result == len(data)
    assert (tmp_path / "download").read_bytes() == data
    assert sum("corrupted" in note for note in faults.injected) == 1


def test_a_range_corrupted_every_time_is_a_checksum_mismatch(tmp_path):
    _data, _faults, result = corrupted_range_download(tmp_path, times=1_000)
    assert isinstance(result, ChecksumMismatch)
    assert "checksum mismatch" in str(result)
    assert "corrupted.blob" in str(result)


def blob_gets(method: str, path: str) -> bool:
    return method == "GET" and path.endswith(".blob")


def small_blobs(count: int) -> dict[str, bytes]:
    """*count* objects of a few KB each, stored; returns key -> bytes."""
    prefix = s3env.new_prefix()
    blobs = {
        f"{prefix}/blobs/{n:02x}/b.blob": os.urandom(3_000 + n) for n in range(count)
    }
    for key, data in blobs.items():
        put_object(key, data)
    return blobs


def read_all(store: ObjectStore, blobs: dict[str, bytes], tmp_path) -> None:
    for n, (key, data) in enumerate(blobs.items()):
        path = tmp_path / f"out{n}"
        with open(path, "wb") as out:
            assert store.download(key, out) == len(data)
        assert path.read_bytes() == data, key


def read_all_through(faults: Faults, blobs: dict[str, bytes], tmp_path) -> None:
    """Read every blob back with a default ObjectStore behind *faults*."""
    with faulty_s3(faults) as server:
        store = ObjectStore(s3env.settings(endpoint_url=server.endpoint_url))
        try:
            read_all(store, blobs, tmp_path)
        finally:
            store.close()


def test_reads_under_a_20_percent_slowdown_rate_succeed_with_the_defaults(tmp_path):
    """Fails before the fix: three attempts in all were the default, and with
    this seed the seventh blob meets three 503 SlowDown answers in a row (a
    20% rate does that to about one set of 30 blobs in three). S3 asks
    clients to back off and retry; within s3-download-deadline they do."""
    blobs = small_blobs(30)
    faults = Faults(error_rate=0.2, applies=blob_gets, seed=5)
    read_all_through(faults, blobs, tmp_path)
    assert len(faults.injected) > 3


def test_reads_under_resets_and_cut_bodies_succeed_with_the_defaults(tmp_path):
    """Connections reset before the answer and bodies cut off halfway are
    retried like throttling, within the deadline."""
    blobs = small_blobs(30)
    faults = Faults(reset_rate=0.15, cut_rate=0.15, applies=blob_gets, seed=2)
    read_all_through(faults, blobs, tmp_path)
    assert any(note.startswith("reset") for note in faults.injected)
    assert any(note.startswith("cut") for note in faults.injected)


def failed_download(store: ObjectStore, key: str, tmp_path) -> ObjectStoreError:
    """Download *key* with *store*, expecting it to fail; close the store and
    return the error."""
    try:
        with (
            open(tmp_path / "out", "wb") as out,
            pytest.raises(ObjectStoreError) as info,
        ):
            store.download(key, out)
    finally:
        store.close()
    return info.value


def test_a_stalled_read_fails_within_the_deadline_naming_key_and_cause(tmp_path):
    """With the default timeouts and deadline, a server that never answers
    costs one read timeout, then no attempt starts that could outlast the
    deadline. (The one slow test here: about s3-download-read-timeout.)"""
    (key,) = small_blobs(1)
    with faulty_s3(Faults(stall=25, applies=blob_gets)) as server:
        settings = s3env.settings(endpoint_url=server.endpoint_url)
        started = time.monotonic()
        error = failed_download(ObjectStore(settings), key, tmp_path)
        elapsed = time.monotonic() - started
    assert elapsed >= settings.download_read_timeout
    assert elapsed < settings.download_deadline + 1.0, f"gave up after {elapsed:.1f}s"
    message = str(error)
    assert f"s3://{s3env.BUCKET}/{key}" in message
    assert "Timeout" in message
    assert "1 attempt" in message
    assert "s3-download-deadline" in message


def test_download_max_attempts_still_caps_the_attempts(tmp_path):
    """``download_max_attempts=3``, as configurations written for the count
    still set it: it caps the attempts within the deadline, and the error
    says how many were made and how long they took."""
    (key,) = small_blobs(1)
    faults = Faults(error_rate=1.0, applies=blob_gets)
    with faulty_s3(faults) as server:
        store = ObjectStore(
            s3env.settings(endpoint_url=server.endpoint_url, download_max_attempts=3)
        )
        error = failed_download(store, key, tmp_path)
    assert len(faults.injected) == 3
    message = str(error)
    assert "SlowDown" in message
    assert "3 attempts" in message
    assert key in message


@pytest.mark.s3_servers("moto", "rgw")
def test_a_checksum_mismatch_is_tried_once_more_not_until_the_deadline(tmp_path):
    """Bytes that differ from the recorded CRC32 may have been damaged in
    transit, so they are fetched once more; a second mismatch means the
    stored object is damaged, and waiting out the deadline would not help."""
    key = f"{s3env.new_prefix()}/blobs/damaged.blob"
    s3env.server().client().put_object(
        Bucket=s3env.BUCKET,
        Key=key,
        Body=b"damaged bytes",
        Metadata={CHECKSUM_METADATA: f"{zlib.crc32(b'original bytes'):08x}"},
    )
    store = ObjectStore(s3env.settings())
    gets = []
    store.clients[1].meta.events.register(
        "before-send.s3.GetObject", lambda **kw: gets.append(1)
    )
    started = time.monotonic()
    error = failed_download(store, key, tmp_path)
    assert len(gets) == 2
    assert time.monotonic() - started < 5
    assert "checksum mismatch" in str(error)
    assert "2 attempts" in str(error)
