"""A short soak in `make test`: `bench.soak` for ~10 s at modest concurrency, zero errors.

The same `soak()` as `make soak` (sandbox and server as real processes, streams walking a seeded
filter, unary List/Get calls), smaller: it asserts that nothing failed and that every kind of
call was made and answered, and nothing about speed or memory (the report prints both).
"""

from __future__ import annotations

from bench import soak

SHORT = soak.SoakOptions(seconds=10.0, streams=30, unary_concurrency=10, groups=2_000)


async def test_short_soak_has_no_errors() -> None:
    report = await soak.soak(SHORT)
    print(soak.render(report))  # shown with -s, or on failure

    assert report.load.errors == {}, report.load.error_samples
    assert report.server_error_lines == []
    assert report.server_exit_code == 0
    assert report.failures == []
    # Every kind of call was made and answered at least once (liveness, not speed).
    assert report.load.stream_messages > 0
    assert report.load.calls[soak.LIST] > 0
    assert report.load.calls[soak.GET] > 0
    assert report.rss_kib, "no RSS sample of the server"
