"""``oppu token``: per-user bearer tokens for the serving API.

    oppu token create --tokens s3://tokens-bucket/oppu --user 310      # adds a token; prints it last
    oppu token rotate --tokens s3://tokens-bucket/oppu --user 310      # new token, older ones revoked
    oppu token revoke --tokens s3://tokens-bucket/oppu --user 310 [--token oppu_...]

``--tokens`` is the serve app's ``tokens`` root (``--store``, its older name, still works: where the
app sets no ``tokens``, the adapter store's root). Writing there takes the token store's own
credentials: ``OPPU_TOKENS_AWS_ACCESS_KEY_ID`` / ``OPPU_TOKENS_AWS_SECRET_ACCESS_KEY`` when set.

The plain token is shown once, as the last line of stdout (scripts take ``| tail -n1``); the
store keeps only its sha256. Everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import sys

from oppu.errors import ConfigError, UserIdError
from oppu.ids import validate_user_id

HELP = "Create, rotate or revoke a user's API token for the serving endpoint."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text in (("create", "add a token for the user and print it"),
                              ("rotate", "add a token, revoke every older one, print the new one"),
                              ("revoke", "revoke one token of the user, or all of them")):
        sub = actions.add_parser(action, help=help_text, description=help_text)
        sub.add_argument("--tokens", "--store", dest="store", required=True,
                         help="token store root URI (a path, file:// or s3://bucket/prefix): the serve "
                              "app's 'tokens', or its 'store' where it sets none")
        sub.add_argument("--user", required=True, help="user id: 1-128 letters, digits, '.', '_', '-'")
        if action == "revoke":
            sub.add_argument("--token", help="the token to revoke (default: all of the user's tokens)")


def run(args: argparse.Namespace) -> int:
    from oppu.store.tokens import TokenStore

    try:
        user = validate_user_id(args.user)
    except UserIdError as exc:
        raise ConfigError(f"--user: {exc}") from exc
    store = TokenStore(args.store)
    if args.action == "revoke":
        revoked = store.revoke(user, args.token)
        if not revoked:
            what = "that token" if args.token else "any token"
            print(f"oppu token: user {user!r} has no {what} in {args.store}", file=sys.stderr)
            return 1
        print(f"revoked {revoked} token(s) of user {user!r}", file=sys.stderr)
        return 0
    token = store.create(user) if args.action == "create" else store.rotate(user)
    note = "older tokens revoked; " if args.action == "rotate" else ""
    print(f"token for user {user!r} ({note}shown once: only its sha256 is stored in {args.store}):",
          file=sys.stderr)
    print(token)
    return 0
