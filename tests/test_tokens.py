"""Unit tests of metis_stream.tokens: job and watch tokens, API keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from metis_stream.tokens import (
    API_KEY_HASH_PREFIX,
    hash_api_key,
    job_token,
    new_secret,
    same_secret,
    watch_token,
)

URLSAFE = re.compile(r"[A-Za-z0-9_-]+\Z")
JOB_A = "j_01HX3ZJ5K1ABCDEFGHJKMNPQRS"
JOB_B = "j_01HX3ZJ5K1ABCDEFGHJKMNPQRT"


def test_new_secret_is_random_and_long():
    secrets_ = {new_secret() for _ in range(50)}
    assert len(secrets_) == 50
    for secret in secrets_:
        assert URLSAFE.match(secret)
        assert len(secret) >= 43  # 32 random bytes


def test_tokens_are_deterministic_urlsafe_and_unpadded():
    token = job_token("s3cret", JOB_A)
    assert token == job_token("s3cret", JOB_A)
    assert URLSAFE.match(token)
    assert "=" not in token
    assert len(base64.urlsafe_b64decode(token + "=")) == 32


def test_job_token_is_an_hmac_of_purpose_and_job():
    expected = hmac.new(b"k", f"job:{JOB_A}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(job_token("k", JOB_A) + "=") == expected


def test_tokens_differ_per_job_purpose_and_secret():
    tokens = {
        job_token("s", JOB_A), job_token("s", JOB_B),
        watch_token("s", JOB_A), watch_token("s", JOB_B),
        job_token("t", JOB_A), watch_token("t", JOB_A),
    }
    assert len(tokens) == 6


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=30),
       st.text(min_size=1, max_size=30))
def test_a_job_token_never_works_as_a_watch_token_or_for_another_job(secret, job, other):
    assert job_token(secret, job) != watch_token(secret, job)
    if job != other:
        assert job_token(secret, job) != job_token(secret, other)
        assert watch_token(secret, job) != watch_token(secret, other)


def test_same_secret():
    token = job_token("s", JOB_A)
    assert same_secret(token, token)
    assert same_secret(token, str(token))
    assert not same_secret(token, token[:-1])
    assert not same_secret(token, token + "x")
    assert not same_secret(token, "")
    assert not same_secret(token, watch_token("s", JOB_A))
    assert same_secret("\u00e9t\u00e9", "\u00e9t\u00e9")  # non-ASCII does not raise


def test_hash_api_key_format():
    hashed = hash_api_key("my key")
    assert hashed.startswith(API_KEY_HASH_PREFIX)
    assert hashed == "sha256:" + hashlib.sha256(b"my key").hexdigest()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", hashed)
    assert hash_api_key("my key") != hash_api_key("my key ")
