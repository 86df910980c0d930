"""A site's own corner of the Redis broker: its ACL user, the keys it may touch, and the
kombu transport options that keep its consumer inside them.

The server creates one Redis ACL user per site (:func:`acl_user_rules`); the site agent
consumes its queue with :func:`transport_options`. Both read the key names from here, so
they cannot drift apart. No Django: the site agent imports this module.

What kombu's Redis transport (5.7) touches while consuming one queue with late acks:

- the queue's lists, one per priority step: ``site.<slug>`` and
  ``site.<slug>\\x06\\x16{3,6,9}`` (BRPOP, RPOP, LLEN, EXISTS; LPUSH/RPUSH to restore);
- the binding tables of the queue's exchange, ``_kombu.binding.site.<slug>`` and
  ``_kombu.binding_permanent.site.<slug>`` (SADD when the queue is declared, SMEMBERS to
  find where a restored message goes);
- the ack emulation's hash, sorted set and mutex. kombu's defaults (``unacked``,
  ``unacked_index``, ``unacked_mutex``) are shared by every consumer of the broker: a site
  allowed to read them would read every other site's unacknowledged messages, so each
  site gets its own through the ``unacked_*_key`` transport options. The mutex is a
  redis-py lock, released by a Lua script (EVALSHA, SCRIPT LOAD on a cold script cache);
  Redis checks the commands a script runs against the caller's ACL, so the script cannot
  reach further than the user could directly.

Key patterns are exact key names, never globs: ``site.a*`` would also match ``site.a-b``.
"""

from __future__ import annotations

import re

from training.queues import site_queue

__all__ = [
    "PRIORITY_SEPARATOR",
    "PRIORITY_STEPS",
    "SiteSlugError",
    "acl_rules",
    "acl_user_rules",
    "binding_keys",
    "broker_username",
    "check_slug",
    "queue_keys",
    "site_keys",
    "transport_options",
    "unacked_keys",
]

# kombu's Redis transport defaults (kombu.transport.redis.PRIORITY_STEPS and Channel.sep).
# The server publishes with them, so the site's consumer must use the same values; they
# are passed explicitly so that a change of kombu's defaults fails loudly in the tests.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEPARATOR = "\x06\x16"

# Letters, digits, hyphens and underscores (a Django slug): none of them is special in a
# Redis glob pattern, so an exact key name is also a pattern matching only itself.
_SLUG = re.compile(r"[A-Za-z0-9_-]+")

# Commands a kombu consumer with late acks sends; everything else is denied (-@all).
# No KEYS/SCAN (they list every key name whatever the key patterns), no pub/sub, no
# admin commands, no EVAL of arbitrary text (only the cached lock script via EVALSHA).
CONSUMER_COMMANDS = (
    # connecting: redis-py's handshake and kombu's liveness check. Not CLIENT SETINFO:
    # Redis 7.0 does not know it (ACL SETUSER would fail) and redis-py ignores its refusal.
    "ping", "hello", "auth", "select", "client|setname",
    # the queue's lists
    "brpop", "rpop", "lpush", "rpush", "llen", "exists",
    # the exchange's binding tables
    "sadd", "smembers",
    # ack emulation: unacked messages and their delivery times
    "hset", "hget", "hdel", "zadd", "zrem", "zrange",
    # the restore mutex (a redis-py lock: SET NX PX, released by a script GET + DEL)
    "set", "get", "del", "evalsha", "script|load",
    # restoring is a WATCH/MULTI/EXEC transaction
    "watch", "unwatch", "multi", "exec", "discard",
)  # fmt: skip


class SiteSlugError(ValueError):
    """A site slug that cannot be used to name broker keys safely."""


def check_slug(slug: str) -> str:
    if not _SLUG.fullmatch(slug):
        raise SiteSlugError(
            f"site slug {slug!r} may contain only letters, digits, hyphens and underscores"
        )
    return slug


def broker_username(slug: str) -> str:
    """The site's Redis ACL user name."""
    return site_queue(check_slug(slug))


def queue_keys(slug: str) -> list[str]:
    """The lists of the site's queue, one per priority step (kombu's ``_q_for_pri``)."""
    queue = site_queue(check_slug(slug))
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def binding_keys(slug: str) -> list[str]:
    """The binding tables of the site queue's exchange (named like the queue, as Celery
    names the exchange of a queue it declares)."""
    exchange = site_queue(check_slug(slug))
    return [f"_kombu.binding.{exchange}", f"_kombu.binding_permanent.{exchange}"]


def unacked_keys(slug: str) -> dict[str, str]:
    """The site's own ack-emulation keys, as kombu's transport options name them."""
    queue = site_queue(check_slug(slug))
    return {
        "unacked_key": f"{queue}.unacked",
        "unacked_index_key": f"{queue}.unacked_index",
        "unacked_mutex_key": f"{queue}.unacked_mutex",
    }


def site_keys(slug: str) -> list[str]:
    """Every key the site's consumer may touch."""
    return [*queue_keys(slug), *binding_keys(slug), *unacked_keys(slug).values()]


def transport_options(slug: str, visibility_timeout: float) -> dict[str, object]:
    """kombu Redis transport options for the site's consumer (Celery's
    ``broker_transport_options``). ``visibility_timeout`` must match the server's: a
    message unacknowledged for longer is delivered again."""
    return {
        **unacked_keys(slug),
        "visibility_timeout": visibility_timeout,
        "priority_steps": list(PRIORITY_STEPS),
        "sep": PRIORITY_SEPARATOR,
    }


def acl_rules(slug: str) -> list[str]:
    """The ACL SETUSER rules giving the site's user its keys and the consumer's commands,
    and nothing else: no other key, no pub/sub channel. Password and ``on`` are the
    caller's (:func:`acl_user_rules`)."""
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        *(f"+{command}" for command in CONSUMER_COMMANDS),
        *(f"~{key}" for key in site_keys(slug)),
    ]


def acl_user_rules(
    slug: str, password: str | None = None, *, password_sha256: str | None = None
) -> list[str]:
    """The complete ACL SETUSER rules for the site's user, with its password given in clear
    or as the SHA-256 hex digest Redis also accepts (so the server need not keep it).
    ``reset`` comes first, so that a rotated password replaces the old one at once."""
    if (password is None) == (password_sha256 is None):
        raise ValueError("give the site's broker password or its SHA-256, not both or neither")
    if password is not None:
        if not password:
            raise ValueError("a site's broker password must not be empty")
        secret = f">{password}"
    else:
        if not re.fullmatch(r"[0-9a-f]{64}", password_sha256 or ""):
            raise ValueError("password_sha256 must be 64 lower-case hex digits")
        secret = f"#{password_sha256}"
    return ["reset", "on", secret, *acl_rules(slug)]
