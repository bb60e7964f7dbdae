"""TokenStore on a local directory, and the ``oppu token`` command's output contract."""

from __future__ import annotations

import json

import pytest

from oppu.cli import main as oppu_main
from oppu.errors import UserIdError
from oppu.store.tokens import TOKEN_PREFIX, TokenStore, token_hash


@pytest.fixture
def root(tmp_path) -> str:
    return str(tmp_path / "store")


def test_create_and_verify(root, tmp_path):
    tokens = TokenStore(root)
    first, second = tokens.create("u1"), tokens.create("u1")
    other = tokens.create("u2")
    assert first.startswith(TOKEN_PREFIX) and first != second
    assert tokens.verify(first) == "u1" and tokens.verify(second) == "u1"
    assert tokens.verify(other) == "u2"
    assert tokens.user_has_tokens("u1") and not tokens.user_has_tokens("u3")
    # Only hashes are stored, and a fresh instance (another process) sees the same tokens.
    stored = "".join(p.read_text() for p in (tmp_path / "store").rglob("*.json"))
    assert first not in stored and token_hash(first) in stored
    assert TokenStore(f"file://{root}").verify(first) == "u1"


@pytest.mark.parametrize("bad", ["", "oppu_", "oppu_short", "x" * 48, TOKEN_PREFIX + "A" * 43,
                                 TOKEN_PREFIX + "../../../etc/passwd" + "a" * 24, None, 5])
def test_unknown_or_malformed_tokens_are_refused(root, bad):
    tokens = TokenStore(root)
    tokens.create("u1")
    assert tokens.verify(bad) is None


def test_revoke_one_then_all(root):
    tokens = TokenStore(root)
    first, second, third = (tokens.create("u1") for _ in range(3))
    kept = tokens.create("u2")
    assert tokens.revoke("u1", first) == 1
    assert tokens.verify(first) is None and tokens.verify(second) == "u1"
    assert tokens.revoke("u1", kept) == 0 and tokens.verify(kept) == "u2"
    assert tokens.revoke("u1") == 2
    assert tokens.verify(second) is None and tokens.verify(third) is None
    assert not tokens.user_has_tokens("u1") and tokens.verify(kept) == "u2"


def test_rotate_revokes_older_tokens(root):
    tokens = TokenStore(root)
    old = tokens.create("u1")
    new = tokens.rotate("u1")
    assert new != old and tokens.verify(new) == "u1" and tokens.verify(old) is None


def test_index_entry_alone_does_not_authenticate(root, tmp_path):
    """The per-user file is the source of truth: a stale by-hash entry fails closed."""
    tokens = TokenStore(root)
    token = tokens.create("u1")
    user_file = tmp_path / "store" / "_auth" / "u1.json"
    user_file.write_text(json.dumps({"user": "u1", "tokens": []}))
    assert tokens.verify(token) is None


@pytest.mark.parametrize("user", ["../x", "a/b", "a:b", "x" * 129])
def test_invalid_user_ids_are_refused(root, user, tmp_path):
    with pytest.raises(UserIdError):
        TokenStore(root).create(user)
    assert not (tmp_path / "store").exists()


def test_cli_prints_the_token_last_and_it_verifies(root, capsys):
    assert oppu_main(["token", "create", "--store", root, "--user", "u1"]) == 0
    created = capsys.readouterr().out.splitlines()[-1]
    assert TokenStore(root).verify(created) == "u1"

    assert oppu_main(["token", "rotate", "--store", root, "--user", "u1"]) == 0
    rotated = capsys.readouterr().out.splitlines()[-1]
    assert TokenStore(root).verify(rotated) == "u1" and TokenStore(root).verify(created) is None

    assert oppu_main(["token", "revoke", "--store", root, "--user", "u1", "--token", rotated]) == 0
    assert TokenStore(root).verify(rotated) is None
    assert oppu_main(["token", "revoke", "--store", root, "--user", "u1"]) == 1


def test_cli_bad_user_id_exits_2(root, capsys, tmp_path):
    assert oppu_main(["token", "create", "--store", root, "--user", "../etc"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--user" in captured.err
    assert not (tmp_path / "store").exists()


def test_token_root_has_its_own_s3_credentials():
    """OPPU_TOKENS_AWS_* reach the token store's s3fs options (over nothing else); no effect on local roots."""
    from oppu.store.tokens import token_storage_options

    environ = {"OPPU_TOKENS_AWS_ACCESS_KEY_ID": "tok-key", "OPPU_TOKENS_AWS_SECRET_ACCESS_KEY": "tok-secret",
               "AWS_ACCESS_KEY_ID": "adapter-key"}
    assert token_storage_options("s3://tokens/oppu", {"endpoint_url": "http://s3"}, environ) == {
        "endpoint_url": "http://s3", "key": "tok-key", "secret": "tok-secret"}
    assert token_storage_options("s3://tokens/oppu", {"key": "given"}, environ)["key"] == "given"
    assert token_storage_options("/tmp/tokens", None, environ) == {}
    assert token_storage_options("s3://tokens/oppu", None, {}) == {}


def test_serve_app_reads_tokens_from_their_own_root(tmp_path):
    """``tokens`` separates the token root from the adapter store; unset, the store's root is used."""
    from oppu.serving.config import load_serve_config

    apart = load_serve_config({"model": "m", "store": str(tmp_path / "adapters"), "tokens": str(tmp_path / "tok")})
    assert apart.token_root == str(tmp_path / "tok")
    assert load_serve_config({"model": "m", "store": "s3://b/a"}).token_root == "s3://b/a"
    token = TokenStore(apart.token_root).create("u1")
    assert TokenStore(apart.store).verify(token) is None and TokenStore(apart.token_root).verify(token) == "u1"


def test_cli_tokens_flag_names_the_token_root(tmp_path, capsys):
    tokens_root = str(tmp_path / "tokens")
    assert oppu_main(["token", "create", "--tokens", tokens_root, "--user", "u1"]) == 0
    assert TokenStore(tokens_root).verify(capsys.readouterr().out.splitlines()[-1]) == "u1"
