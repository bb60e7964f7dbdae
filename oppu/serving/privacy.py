"""User ids kept out of telemetry: the routing key Ray Serve sees, and the reference logs use.

Ray Serve's model multiplexing exports every multiplexed model id as the label of its gauge
``serve_registered_multiplexed_model_id`` (one series per id per replica) and names it in its own
load/unload log lines. So the ingress never hands Serve a user id: it routes by
:func:`routing_key`, one of ``routing_buckets`` opaque bucket names a user id hashes into. A user
always lands in the same bucket, so the router still sends a user's requests to the replica that
holds the user's adapter (affinity per bucket rather than per user), the metric's cardinality is
bounded by the bucket count, and a label names a bucket shared by many users, never a user.

Per-user events that are worth a log line (a refused request, an adapter not found) are logged at
DEBUG and name the user by :func:`user_ref`, a keyed hash that cannot be reversed by hashing
candidate ids: its key is ``OPPU_LOG_SALT`` where an operator wants lines comparable across
replicas, else random per process.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

LOG_SALT_ENV = "OPPU_LOG_SALT"
_PROCESS_SALT = secrets.token_bytes(16)


def routing_key(user: str, buckets: int) -> str:
    """The multiplexed model id Serve routes ``user``'s requests by: ``rb<bucket>``.

    Unkeyed on purpose: every ingress replica must map a user to the same bucket, and a bucket
    reveals nothing a label could leak (with many users per bucket, knowing the bucket of a
    given id tells nobody whether that user sent anything).
    """
    digest = hashlib.sha256(user.encode()).digest()
    return f"rb{int.from_bytes(digest[:8], 'big') % buckets}"


def user_ref(user: str | None) -> str:
    """A short stand-in for ``user`` in log lines (``u:`` + 12 hex digits of a keyed hash)."""
    if user is None:
        return "base"
    key = os.environ.get(LOG_SALT_ENV, "").encode() or _PROCESS_SALT
    return "u:" + hmac.new(key, user.encode(), hashlib.sha256).hexdigest()[:12]
