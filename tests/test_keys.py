"""Unit tests of metis_stream.keys: named keys and roles, the listed keys' names, which key
a caller holds, and what each key sees; and how [server.keys.NAME] is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metis_stream.config import Config, ServerConfig, check_auth, load_config
from metis_stream.errors import ConfigError
from metis_stream.keys import (
    KEYLESS,
    ApiKey,
    Role,
    find,
    keyring,
    listed_key,
    named_key,
)
from metis_stream.tokens import API_KEY_HASH_PREFIX, hash_api_key


def test_a_listed_key_is_an_admin_named_after_its_hash_in_either_form():
    plain, hashed = listed_key("s3cret"), listed_key(hash_api_key("s3cret"))
    assert plain.name == hashed.name == hash_api_key("s3cret")[:19]
    assert plain.role is hashed.role is Role.ADMIN
    assert plain.digest == hashed.digest == hash_api_key("s3cret")


def test_a_named_key_defaults_to_client():
    key = named_key("web", {"key": hash_api_key("k")})
    assert key == ApiKey("web", hash_api_key("k"), Role.CLIENT)
    assert named_key("ops", {"key": "k", "role": "admin"}).role is Role.ADMIN


def test_the_key_itself_is_not_in_the_repr():
    assert "plain-secret" not in repr(named_key("web", {"key": "plain-secret"}))


@pytest.mark.parametrize(("name", "table", "message"), [
    ("web", {"key": "k", "role": "owner"}, r"\[server.keys.web\]: role must be one of "
                                           r"client, admin, not 'owner'"),
    ("web", {"key": "k", "role": 1}, "role must be one of client, admin"),
    ("web", {"role": "client"}, r'\[server.keys.web\] needs key = "sha256:..."'),
    ("web", {"key": "  "}, "needs key"),
    ("web", {"key": 5}, "needs key"),
    ("web", {"key": "k", "rol": "admin"}, r"unknown key\(s\) \['rol'\]"),
    ("web", "k", "must be a table"),
    ("w eb", {"key": "k"}, "letters, digits, _ and -"),
    ("sha256:abc", {"key": "k"}, "letters, digits, _ and -"),
    ("", {"key": "k"}, "letters, digits"),
    ("x" * 65, {"key": "k"}, "at most 64"),
])
def test_a_bad_named_key_is_refused_with_where_and_what(name, table, message):
    with pytest.raises(ConfigError, match=message):
        named_key(name, table)


def test_a_key_may_not_be_given_twice():
    web = named_key("web", {"key": hash_api_key("k")})
    with pytest.raises(ConfigError, match=r"\[server\] api_keys \(or METIS_API_KEYS\) and "
                                          r"\[server.keys.web\] give the same key: a key has "
                                          "one name and one role"):
        keyring(["k"], [web])
    with pytest.raises(ConfigError, match=r"\[server.keys.web\] and \[server.keys.app\] give"):
        keyring([], [web, named_key("app", {"key": "k"})])
    with pytest.raises(ConfigError, match=r"\[server\] api_keys \(or METIS_API_KEYS\) lists "
                                          "the same key twice"):
        keyring(["k", hash_api_key("k")], [])


def test_a_malformed_hashed_key_is_refused():
    with pytest.raises(ConfigError, match="not a sha256: form"):
        keyring(["sha256:abc"], [])
    with pytest.raises(ConfigError, match=r"\[server.keys.web\]: .*not a sha256: form"):
        keyring([], [named_key("web", {"key": "sha256:" + "A" * 64})])


def test_find_gives_the_key_the_caller_holds():
    ring = keyring(["admin-key"], [named_key("a", {"key": hash_api_key("key-a")}),
                                   named_key("b", {"key": "key-b"})])
    assert find(ring, "key-a") == ring[1]
    assert find(ring, "key-b") == ring[2]
    assert find(ring, "admin-key") == ring[0]
    assert find(ring, "key-c") is None
    assert find(ring, "") is None
    assert find(ring, "KEY-A") is None


def test_knowing_the_hash_is_not_knowing_the_key():
    assert find(keyring([hash_api_key("s3cret")], []), hash_api_key("s3cret")) is None


def test_no_keys_match_nothing():
    assert find((), "anything") is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), max_size=5, unique=True),
       st.text(max_size=20), st.booleans())
def test_find_is_membership(entries, given_key, hashed):
    # A plain entry that itself starts with "sha256:" is taken as a hash; keep the model simple.
    if any(entry.startswith(API_KEY_HASH_PREFIX) or not entry.strip() for entry in entries):
        return
    ring = keyring([hash_api_key(entry) if hashed else entry for entry in entries], [])
    found = find(ring, given_key)
    assert (found is not None) == (given_key in entries)
    if found is not None:
        assert found.digest == hash_api_key(given_key)


def test_a_client_sees_its_own_jobs_an_admin_every_job():
    client = ApiKey("a", "k", Role.CLIENT)
    admin = ApiKey("ops", "k2", Role.ADMIN)
    assert client.sees("a") and not client.sees("b") and not client.sees("")
    assert admin.sees("a") and admin.sees("b") and admin.sees("")
    assert client.owner_filter == "a" and admin.owner_filter is None
    assert KEYLESS.admin and KEYLESS.name == ""


# The configuration


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path}"\n' + text)
    return path


def test_named_keys_are_read_from_the_file(tmp_path):
    path = write(tmp_path, f'''api_keys = ["legacy"]
[server.keys.web]
key = "{hash_api_key("web-key")}"
[server.keys.ops]
key = "ops-key"
role = "admin"
''')
    server = load_config(path, {}).server
    assert [(key.name, key.role) for key in server.keyring] == [
        (hash_api_key("legacy")[:19], Role.ADMIN), ("web", Role.CLIENT), ("ops", Role.ADMIN)]
    check_auth(load_config(path, {}))


def test_named_keys_alone_let_a_server_start(tmp_path):
    path = write(tmp_path, '[server.keys.web]\nkey = "k"\n')
    config = load_config(path, {})
    check_auth(config)
    assert config.server.api_keys == ()


@pytest.mark.parametrize(("text", "message"), [
    ('[server.keys.web]\nkey = "k"\nrole = "root"\n', r"\[server.keys.web\]: role must be"),
    ('api_keys = ["k"]\n[server.keys.web]\nkey = "k"\n', "give the same key"),
    ('keys = ["k"]\n', r"\[server\] keys: give each key a table"),
    ('[server.keys.web]\nkey = "k"\nname = "x"\n', r"unknown key\(s\) \['name'\]"),
])
def test_bad_keys_in_the_file_are_refused_with_where(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), {})


def test_a_key_in_the_environment_and_the_file_is_refused(tmp_path):
    path = write(tmp_path, '[server.keys.web]\nkey = "k"\n')
    with pytest.raises(ConfigError, match="give the same key"):
        load_config(path, {"METIS_API_KEYS": "k"})


def test_no_environment_variable_sets_named_keys(tmp_path):
    config = load_config(write(tmp_path, ""), {"METIS_KEYS": "k"})
    assert config.server.keys == ()


def test_check_auth_refuses_a_key_given_twice_in_a_config_built_by_hand():
    server = ServerConfig(api_keys=("k",), keys=(ApiKey("web", "k"),))
    with pytest.raises(ConfigError, match="give the same key"):
        check_auth(Config(server=server))


def test_keys_and_insecure_no_auth_together_are_refused():
    server = ServerConfig(keys=(ApiKey("web", "k"),), insecure_no_auth=True)
    with pytest.raises(ConfigError, match="both API keys"):
        check_auth(Config(server=server))
