"""sipctl: the operator's tool.  It talks to Redis only, so it works from any host.

  sipctl users add USER --password PW     add or change a user (HA1 hashes only are kept)
  sipctl users del USER                   remove a user and its registrations
  sipctl users list [--json]
  sipctl users import FILE                CSV lines "user,password" (header line optional)
  sipctl users demo                       the demo directory: 1000-1019, password 1234
  sipctl regs [AOR] [--json]              registered contacts
  sipctl cluster [--json]                 live dispatchers and workers
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time

from .config import Config, load
from .sip import digest
from .store import Store, StoreUnavailable, aor_of

DEMO_USERS = [str(n) for n in range(1000, 1020)]
DEMO_PASSWORD = "1234"


def ha1_hashes(user: str, realm: str, password: str) -> dict[str, str]:
    return {alg: digest.ha1(user, realm, password, alg) for alg in ("MD5", "SHA-256")}


def _print_rows(rows: list[dict], columns: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        print("(none)")
        return
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


# --------------------------------------------------------------------------- users


def cmd_users(args, config: Config, store: Store) -> int:
    realm = config.realm
    if args.action == "add":
        store.put_user(args.user, realm, ha1_hashes(args.user, realm, args.password))
        print(f"user {args.user}@{realm} saved")
    elif args.action == "del":
        if not store.delete_user(args.user, realm):
            print(f"no user {args.user}@{realm}", file=sys.stderr)
            return 1
        print(f"user {args.user}@{realm} deleted")
    elif args.action == "list":
        rows = [{"user": u["user"], "realm": u["realm"], "algorithms": ",".join(sorted(u["ha1"])),
                 "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(u["created"]))}
                for u in store.list_users(realm)]
        _print_rows(rows, ["user", "realm", "algorithms", "created"], args.json)
    elif args.action == "import":
        count = store.put_users(_read_csv(args.file, realm))
        print(f"{count} users imported into realm {realm}")
    elif args.action == "demo":
        entries = [(u, realm, ha1_hashes(u, realm, DEMO_PASSWORD)) for u in DEMO_USERS]
        store.put_users(entries)
        print(f"demo users {DEMO_USERS[0]}-{DEMO_USERS[-1]} (password {DEMO_PASSWORD}) "
              f"provisioned in realm {realm}")
        print("WARNING: demo passwords are public knowledge: change them "
              "(sipctl users add USER --password ...) before real use", file=sys.stderr)
    return 0


def _read_csv(path: str, realm: str):
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle):
            if not row or row[0].strip().startswith("#"):
                continue
            user, password = row[0].strip(), (row[1].strip() if len(row) > 1 else "")
            if user.lower() in ("user", "username") and password.lower() in ("password", "pass"):
                continue  # a header line
            if not user or not password:
                raise SystemExit(f"{path}: line without user and password: {row!r}")
            yield user, realm, ha1_hashes(user, realm, password)


# --------------------------------------------------------------------------- registrations


def cmd_regs(args, config: Config, store: Store) -> int:
    now = time.time()
    if args.aor:
        user = args.aor.split(":", 1)[-1].split("@", 1)[0]
        aors = [aor_of(user, config.realm)]
    else:
        aors = store.registered_aors()
    rows = []
    for aor in aors:
        for b in store.bindings(aor, now):
            rows.append({"aor": aor, "contact": b.contact.decode("latin-1"),
                         "source": f"{b.source[0]}:{b.source[1]}", "transport": b.transport,
                         "host": b.host, "user_agent": b.user_agent,
                         "expires_in": int(b.expires_at - now), "instance": b.instance or ""})
    _print_rows(rows, ["aor", "contact", "source", "transport", "expires_in", "user_agent"],
                args.json)
    return 0


def cmd_cluster(args, config: Config, store: Store) -> int:
    now = time.time()
    rows = []
    for proc in store.processes():
        row = dict(proc)
        row["age"] = round(now - proc.get("seen", now), 1)
        row["uptime"] = int(now - proc.get("started", now))
        rows.append(row)
    _print_rows(rows, ["role", "host", "name", "pid", "age", "uptime", "received"], args.json)
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config (default: SIPCLUSTER_CONFIG or deploy/)")
    sub = parser.add_subparsers(dest="command", required=True)

    users = sub.add_parser("users", help="the directory of users")
    users_sub = users.add_subparsers(dest="action", required=True)
    add = users_sub.add_parser("add")
    add.add_argument("user")
    add.add_argument("--password", required=True)
    delete = users_sub.add_parser("del")
    delete.add_argument("user")
    listing = users_sub.add_parser("list")
    listing.add_argument("--json", action="store_true")
    imp = users_sub.add_parser("import")
    imp.add_argument("file")
    users_sub.add_parser("demo")

    regs = sub.add_parser("regs", help="registered contacts")
    regs.add_argument("aor", nargs="?")
    regs.add_argument("--json", action="store_true")

    cluster = sub.add_parser("cluster", help="live processes")
    cluster.add_argument("--json", action="store_true")
    return parser


COMMANDS = {"users": cmd_users, "regs": cmd_regs, "cluster": cmd_cluster}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load(args.config)
    store = Store(config.redis.url, timeout=2.0, max_connections=4)
    try:
        return COMMANDS[args.command](args, config, store)
    except StoreUnavailable as exc:
        print(f"sipctl: Redis at {config.redis.url} is not answering: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
