#!/usr/bin/env python3
"""Regenerates src/timestamp/python_cases.tsv: what Python says for each ISO-8601 input.

Columns: input, whole microseconds since the epoch, repr(datetime.timestamp()).
The Rust tests check that our parser and renderer agree with Python bit for bit,
because SDKs compare our number with one Flagsmith's API computed in Python.
Run: python3 scripts/gen_timestamp_cases.py > src/timestamp/python_cases.tsv
"""
from datetime import datetime, timezone, timedelta
import random

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

fixed = [
    "2025-07-14T13:49:43.123456+00:00",
    "2025-07-14T13:49:43+00:00",
    "2025-07-14T13:49:43Z",
    "2025-07-14T13:49:43",
    "2025-07-14T13:49:43.1",
    "2025-07-14T13:49:43.12Z",
    "2025-07-14T13:49:43.123Z",
    "2025-07-14T13:49:43.1234567+00:00",
    "2025-07-14T13:49:43.000001+00:00",
    "2025-07-14T13:49:43.999999+00:00",
    "2025-07-14T13:49:43.5-01:30",
    "2025-07-14T13:49:43.5-0130",
    "2025-07-14T13:49:43+05:30",
    "2025-07-14T13:49:43+01",
    "2025-07-14 13:49:43.654321+02:00",
    "2025-07-14t13:49:43",
    "2025-07-14T13:49",
    "2025-07-14T13",
    "2025-07-14",
    "2024-02-29T23:59:59.999999Z",
    "2000-01-01T00:00:00Z",
    "1970-01-01T00:00:00Z",
    "1970-01-01T00:00:00.000001Z",
    "2038-01-19T03:14:08Z",
    "2100-12-31T23:59:59.5Z",
    "2024-12-26T16:18:08.760000+00:00",
]

rng = random.Random(20261125)
randoms = []
for _ in range(300):
    micros = rng.randrange(0, 4_102_444_800 * 10**6)  # up to 2100
    dt = EPOCH + timedelta(microseconds=micros)
    off = timedelta(minutes=rng.choice([0, 0, 0, 60, -300, 330, 765, -570]))
    randoms.append(dt.astimezone(timezone(off)).isoformat())

print("# input\tmicros\trepr(datetime.timestamp())")
for text in fixed + randoms:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - EPOCH
    micros = (delta.days * 86400 + delta.seconds) * 10**6 + delta.microseconds
    print(f"{text}\t{micros}\t{dt.timestamp()!r}")
