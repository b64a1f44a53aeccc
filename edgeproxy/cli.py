"""The ``edgeproxy`` command (SPEC §1): ``serve``, ``check``, ``keys …``, ``usage``.

Job: parse the command line, load relay.yaml, call ``db`` or the server, print the
result, and turn every expected failure into one line on stderr and an exit code:
0 ok, 2 bad usage or bad config, 1 anything else (no such key, database unusable),
130 after Ctrl-C.

Rules: stdout carries only what a script consumes (a secret, a table, JSON); notes and
errors go to stderr. A secret is printed once, by ``keys create`` / ``keys rotate``, and
a secret's hash never. No traceback for an expected error. The server is imported only
by ``serve``, so ``keys`` commands start fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any

from edgeproxy import __version__, db, ledger
from edgeproxy.config import ConfigError, load_config, summary
from edgeproxy.ledger import REPORT_FIELDS
from edgeproxy.records import check_expires

Handler = Callable[[argparse.Namespace, str], int]


class BadArgument(Exception):
    """A flag value that breaks a rule: exit 2 with this one line."""


# --- flag values -----------------------------------------------------------------------


def _is_none(text: str) -> bool:
    return text.strip().lower() == "none"


def parse_budget(text: str, *, removable: bool) -> float | None:
    if removable and _is_none(text):
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        hint = " or none" if removable else ""
        raise BadArgument(f"--budget: expected a non-negative number of USD{hint}, got {text!r}")
    return value


def parse_limit(flag: str, text: str, *, removable: bool) -> int | None:
    if removable and _is_none(text):
        return None
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        hint = " or none" if removable else ""
        raise BadArgument(f"--{flag}: expected a positive integer{hint}, got {text!r}")
    return int(text)


def parse_models(text: str) -> tuple[str, ...]:
    """``gpt-4o*,claude-*`` -> globs; ``''`` -> () (every model)."""
    if not text.strip():
        return ()
    globs = [glob.strip() for glob in text.split(",")]
    for glob in globs:
        if not glob or re.search(r"\s", glob):
            raise BadArgument(
                f"--models: expected comma-separated globs such as 'gpt-4o*,claude-*', got {text!r}"
            )
    return tuple(globs)


def parse_expires(text: str, *, removable: bool) -> date | None:
    if removable and _is_none(text):
        return None
    try:
        return check_expires(text)
    except db.InvalidValue:
        hint = " or none" if removable else ""
        raise BadArgument(f"--expires: expected a date YYYY-MM-DD{hint}, got {text!r}") from None


def parse_since(text: str, now: float) -> float:
    try:
        return ledger.parse_since(text, now)
    except db.InvalidValue as exc:
        raise BadArgument(f"--since: {exc}") from None


def parse_by(text: str) -> list[str]:
    fields = [field.strip() for field in text.split(",")]
    bad = [field for field in fields if field not in REPORT_FIELDS]
    if bad:
        choices = ",".join(REPORT_FIELDS)
        raise BadArgument(f"--by: expected some of {choices}, got {text!r}")
    return fields


# --- output ----------------------------------------------------------------------------


def _note(line: str) -> None:
    print(line, file=sys.stderr)


def _number(value: float | None) -> str:
    """USD without float noise: 10 -> '10', 0.0125 -> '0.0125'; None -> '-'."""
    if value is None:
        return "-"
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"


def _plain(value: object) -> str:
    return "-" if value is None else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> None:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    print(line([h.upper() for h in headers]))
    for row in rows:
        print(line(row))


def _key_cells(key: db.KeyRecord) -> list[str]:
    return [
        key.name, key.prefix, key.state(), _number(key.budget_usd), _number(key.spent_usd),
        ",".join(key.models) or "(all)", _plain(key.rpm), _plain(key.tpm),
        _plain(key.concurrency), _plain(key.expires), key.created_at[:16].replace("T", " "),
    ]  # fmt: skip


_KEY_HEADERS = ("name", "prefix", "state", "budget", "spent", "models", "rpm", "tpm",
                "concurrency", "expires", "created")  # fmt: skip


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _warn_if_expired(key: db.KeyRecord) -> None:
    if key.expired():
        _note(f"edgeproxy: note: key {key.name!r} expired at the end of {key.expires} (UTC)")


# --- commands --------------------------------------------------------------------------


def _database(path: str) -> str:
    """The database path from relay.yaml. Config warnings (say, an upstream without keys)
    do not matter to key management, so they are not printed here."""
    return load_config(path).database  # ConfigError -> exit 2 in main()


def cmd_serve(args: argparse.Namespace, path: str) -> int:
    config = load_config(path)
    from edgeproxy.supervisor import run  # late: aiohttp and friends only when serving

    try:
        return run(config, path)
    except OSError as exc:  # e.g. the port is taken: one line, no traceback
        print(f"edgeproxy: cannot serve: {exc.strerror or exc}", file=sys.stderr)
        return 1


def cmd_check(args: argparse.Namespace, path: str) -> int:
    config = load_config(path)
    warnings = {f"warning: {w}" for w in config.warnings}
    for line in summary(config):
        if line not in warnings:
            print(line)
    for line in sorted(warnings):
        _note(line)
    return 0


def _limits(args: argparse.Namespace, *, removable: bool) -> dict[str, Any]:
    """The key flags given on the command line, parsed (absent flags are left out)."""
    given: dict[str, Any] = {}
    if args.budget is not None:
        given["budget"] = parse_budget(args.budget, removable=removable)
    if args.models is not None:
        given["models"] = parse_models(args.models)
    for flag in ("rpm", "tpm", "concurrency"):
        if getattr(args, flag) is not None:
            given[flag] = parse_limit(flag, getattr(args, flag), removable=removable)
    if args.expires is not None:
        given["expires"] = parse_expires(args.expires, removable=removable)
    return given


def cmd_keys_create(args: argparse.Namespace, path: str) -> int:
    limits = _limits(args, removable=False)
    key, secret = db.create_key(_database(path), args.name, **limits)
    sys.stdout.write(secret + "\n")
    sys.stdout.flush()
    _note(
        f"created key {key.name!r} ({key.prefix}...); store the secret now, it cannot be shown again"
    )
    _warn_if_expired(key)
    return 0


def cmd_keys_list(args: argparse.Namespace, path: str) -> int:
    keys = db.list_keys(_database(path))
    if args.json:
        _print_json([key.to_json() for key in keys])
    elif not keys:
        _note("no keys yet; create one with: edgeproxy keys create NAME")
    else:
        _table(_KEY_HEADERS, [_key_cells(key) for key in keys], right={3, 4, 6, 7, 8})
    return 0


def cmd_keys_show(args: argparse.Namespace, path: str) -> int:
    key = db.get_key(_database(path), args.name)
    if args.json:
        _print_json(key.to_json())
        return 0
    for header, cell in zip(_KEY_HEADERS, _key_cells(key), strict=True):
        print(f"{header + ':':<13}{cell}")
    return 0


def cmd_keys_set(args: argparse.Namespace, path: str) -> int:
    changes = _limits(args, removable=True)
    if not changes:
        raise BadArgument(
            "keys set: nothing to change; give one or more of"
            " --budget, --models, --rpm, --tpm, --concurrency, --expires"
        )
    key = db.update_key(_database(path), args.name, **changes)
    _note(f"updated key {key.name!r}: {', '.join(changes)}; now {key.state()}")
    _warn_if_expired(key)
    return 0


def cmd_keys_disable(args: argparse.Namespace, path: str) -> int:
    db.set_disabled(_database(path), args.name, True)
    _note(f"disabled key {args.name!r}")
    return 0


def cmd_keys_enable(args: argparse.Namespace, path: str) -> int:
    key = db.set_disabled(_database(path), args.name, False)
    _note(f"enabled key {key.name!r}; now {key.state()}")
    return 0


def cmd_keys_delete(args: argparse.Namespace, path: str) -> int:
    db.delete_key(_database(path), args.name)
    _note(f"deleted key {args.name!r}; its usage stays in the ledger")
    return 0


def cmd_keys_rotate(args: argparse.Namespace, path: str) -> int:
    secret = db.rotate_key(_database(path), args.name)
    sys.stdout.write(secret + "\n")
    sys.stdout.flush()
    _note(
        f"rotated key {args.name!r} ({db.display_prefix(secret)}...); the old secret stops"
        " working; store the new one now, it cannot be shown again"
    )
    return 0


def cmd_usage(args: argparse.Namespace, path: str) -> int:
    by = parse_by(args.by) if args.by is not None else ["key"]
    since = parse_since(args.since, time.time()) if args.since is not None else None
    report = db.usage_report(_database(path), key=args.key, since_ts=since, by=by)
    if args.json:
        _print_json(report)
        return 0
    sums = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
            "estimated_requests")  # fmt: skip

    def cells(row: dict[str, Any], labels: list[str]) -> list[str]:
        numbers = [_number(row[s]) if s == "cost_usd" else str(row[s]) for s in sums]
        return labels + numbers

    rows = [cells(row, [_plain(row[f]) for f in by]) for row in report["rows"]]
    rows.append(cells(report["total"], ["total"] + [""] * (len(by) - 1)))
    headers = [*by, "requests", "prompt", "completion", "cached", "cost_usd", "estimated"]
    _table(headers, rows, right=set(range(len(by), len(headers))))
    return 0


# --- the parser ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    # -c/--config is accepted before and after the subcommand (SPEC §1): the main parser
    # holds the default, and every subparser adds it with SUPPRESS so it overrides only
    # when given there.
    config_help = "relay.yaml to use (default: $EDGEPROXY_CONFIG, else ./relay.yaml)"
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "-c", "--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help
    )
    parser = argparse.ArgumentParser(
        prog="edgeproxy", description="Self-hosted OpenAI-compatible LLM API relay."
    )
    parser.add_argument("-c", "--config", metavar="PATH", default=None, help=config_help)
    parser.add_argument("--version", action="version", version=f"edgeproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(group: Any, name: str, handler: Handler, about: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(
            name, parents=[config], help=about, description=about
        )
        sub.set_defaults(handler=handler)
        return sub

    command(commands, "serve", cmd_serve, "run the relay in the foreground")
    command(commands, "check", cmd_check, "validate the config offline and print a summary")
    keys = commands.add_parser("keys", parents=[config], help="create and manage API keys")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, handler, about in [
        ("create", cmd_keys_create, "create a key; prints only its secret"),
        ("set", cmd_keys_set, "change a key's budget, models, limits or expiry"),
    ]:
        sub = command(actions, name, handler, about)
        sub.add_argument("name", metavar="NAME")
        none = " ('none' removes it)" if name == "set" else ""
        sub.add_argument(
            "--budget", metavar="USD", help=f"spend limit in USD; 0 = nothing may be spent{none}"
        )
        sub.add_argument(
            "--models", metavar="GLOB,...", help="allowed model globs; '' = all models"
        )
        sub.add_argument("--rpm", metavar="N", help=f"requests per minute{none}")
        sub.add_argument("--tpm", metavar="N", help=f"tokens per minute{none}")
        sub.add_argument("--concurrency", metavar="N", help=f"requests at once{none}")
        sub.add_argument(
            "--expires", metavar="YYYY-MM-DD", help=f"valid through this UTC day{none}"
        )
    for name, handler, about in [
        ("list", cmd_keys_list, "list every key (never the secret)"),
        ("show", cmd_keys_show, "show one key (never the secret)"),
    ]:
        sub = command(actions, name, handler, about)
        if name == "show":
            sub.add_argument("name", metavar="NAME")
        sub.add_argument("--json", action="store_true", help="print JSON")
    for name, handler, about in [
        ("disable", cmd_keys_disable, "refuse the key's requests until enabled"),
        ("enable", cmd_keys_enable, "accept the key's requests again"),
        ("delete", cmd_keys_delete, "delete the key (its usage history stays)"),
        ("rotate", cmd_keys_rotate, "give the key a new secret; prints only the secret"),
    ]:
        command(actions, name, handler, about).add_argument("name", metavar="NAME")
    report = command(
        commands, "usage", cmd_usage, "report requests, tokens and cost from the ledger"
    )
    report.add_argument("--key", metavar="NAME", help="only this key")
    report.add_argument("--since", metavar="24h|7d|30m|YYYY-MM-DD", help="only usage since then")
    report.add_argument(
        "--by", metavar="key,model,upstream,day", help="group rows by (default: key)"
    )
    report.add_argument("--json", action="store_true", help='print {"rows": [...], "total": {...}}')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)  # bad usage: argparse prints it and exits 2
        path = args.config or os.environ.get("EDGEPROXY_CONFIG") or "relay.yaml"
        return args.handler(args, path)
    except KeyboardInterrupt:
        return 130
    except ConfigError as err:
        _note(str(err))  # already "file: yaml.path: problem"
        return 2
    except (BadArgument, db.InvalidValue) as err:
        _note(f"edgeproxy: {err}")
        return 2
    except db.DbError as err:
        _note(f"edgeproxy: {err}")
        return 1
    except BrokenPipeError:  # `edgeproxy keys list | head -1`: the reader left; stay quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
