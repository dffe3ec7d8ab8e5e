"""Operating commands of the `reminders` CLI: pause, resume, cancel, opt-out/in, stop an
enrolment, status, audit, reload.

They work on the database directly (no API token needed: whoever can reach the database is an
admin), through the same `Lifecycle` service as the HTTP API; the actor recorded in the audit log
is `cli:<OS user>`. Daemons hear about each change through a NOTIFY (see scheduler.app.control).
"""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from scheduler.cli.common import run_with_store

if TYPE_CHECKING:
    from scheduler.app.lifecycle import ActionResult, Lifecycle
    from scheduler.store.postgres import Store


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "cli:unknown"


def _print_action(result: Any, as_json: bool) -> None:
    data = result.as_dict()
    if as_json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return
    target = data["plan_id"] or "every plan"
    who = f"user {data['user_id']} / {target}" if data["user_id"] else f"plan {target}"
    line = f"{data['action'].replace('_', ' ')}: {who}"
    if data["state"]:
        line += f" is now {data['state']}"
    line += f" (version {data['version']}, by {data['actor']}, event {data['event_id']})"
    print(line)
    details = data["details"]
    if details.get("mode") == "catch_up":
        print(
            f"  catch-up: {len(details.get('caught_up', []))} occurrence(s) queued to send now, "
            f"{len(details.get('missed', []))} past the grace window recorded missed"
        )
    elif details.get("mode") == "skip":
        skipped = details.get("skipped_steps", len(details.get("skipped", [])))
        print(f"  skip: {skipped} held-back occurrence(s)/step(s) recorded skipped (paused)")


def _lifecycle_action(
    args: argparse.Namespace, action: Callable[[Lifecycle, str], Awaitable[ActionResult]]
) -> int:
    """Run one `Lifecycle` action (given the service and the actor) and print what it did."""
    from scheduler.app.lifecycle import Lifecycle

    async def work(store: Store) -> ActionResult:
        return await action(Lifecycle(store), cli_actor())

    _print_action(run_with_store(args, work), args.json)
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    return _lifecycle_action(
        args, lambda lc, actor: lc.pause(args.plan_id, actor=actor, reason=args.reason)
    )


def cmd_resume(args: argparse.Namespace) -> int:
    return _lifecycle_action(
        args,
        lambda lc, actor: lc.resume(
            args.plan_id, actor=actor, reason=args.reason, catch_up=args.catch_up
        ),
    )


def cmd_cancel(args: argparse.Namespace) -> int:
    return _lifecycle_action(
        args, lambda lc, actor: lc.cancel(args.plan_id, actor=actor, reason=args.reason)
    )


def cmd_opt_out(args: argparse.Namespace) -> int:
    return _lifecycle_action(
        args,
        lambda lc, actor: lc.opt_out(
            args.user_id, plan_id=args.plan, actor=actor, reason=args.reason
        ),
    )


def cmd_opt_in(args: argparse.Namespace) -> int:
    return _lifecycle_action(
        args,
        lambda lc, actor: lc.opt_in(
            args.user_id, plan_id=args.plan, actor=actor, reason=args.reason
        ),
    )


def cmd_stop_enrollment(args: argparse.Namespace) -> int:
    return _lifecycle_action(
        args,
        lambda lc, actor: lc.stop_enrollment(
            args.plan_id, args.user_id, actor=actor, reason=args.reason
        ),
    )


def cmd_status(args: argparse.Namespace) -> int:
    from scheduler.app import status
    from scheduler.app.engagement import policy_of
    from scheduler.cli.common import UsageError, settings_for

    policy = policy_of(settings_for(args).plans_dir)
    window = policy.engagement.attribution_window.as_timedelta()

    async def work(store: Store) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        now = datetime.now(UTC)
        if args.plan_id is None:
            return await status.overview(store, now=now), None
        report = await status.plan_status(
            store,
            args.plan_id,
            now=now,
            next_n=args.next,
            window=window,
            guard=policy.guard_for(args.plan_id),
        )
        if report is None:
            raise UsageError(f"no plan {args.plan_id!r} is loaded (see `reminders status`)")
        return report, await status.replicas(store)

    report, replica_rows = run_with_store(args, work)
    if args.json:
        if replica_rows is not None:
            report["replicas"] = replica_rows
        print(json.dumps(report, ensure_ascii=False, indent=2))
    elif args.plan_id is None:
        print(status.render_overview(report))
    else:
        print(status.render_plan(report, replica_rows))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from scheduler.app.lifecycle import Lifecycle

    async def work(store: Store) -> list[dict[str, Any]]:
        return await Lifecycle(store).audit(plan_id=args.plan, user_id=args.user, limit=args.limit)

    events = run_with_store(args, work)
    if args.json:
        print(json.dumps(events, ensure_ascii=False, indent=2))
        return 0
    for e in reversed(events):  # oldest first, like a log
        at = datetime.fromisoformat(e["at"]).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        subject = e["plan_id"] or "*"
        if e["user_id"]:
            subject += f" user {e['user_id']}"
        version = f" v{e['version']}" if e["version"] is not None else ""
        reason = f": {e['reason']}" if e["reason"] else ""
        print(f"{at}  {e['action']:<15} {subject}{version}  by {e['actor']}{reason}")
    if not events:
        print("no events")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        await store.control.notify("reload")
        return await store.status.live_replica_count()

    alive = run_with_store(args, work)
    print(f"reload requested; {alive} live replica(s) will rescan their plans folder")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the operating commands to the `reminders` parser."""

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("pause", help="pause a plan: nothing new starts, a fan-out stops")
    p.add_argument("plan_id")
    p.add_argument("--reason", required=True, help="why (kept in the audit log)")
    json_flag(p)
    p.set_defaults(func=cmd_pause)

    p = sub.add_parser("resume", help="resume a paused plan (skip what was missed, by default)")
    p.add_argument("plan_id")
    p.add_argument(
        "--catch-up",
        action="store_true",
        help="send now what the pause held back and is still within the plan's grace window "
        "(the rest is recorded missed)",
    )
    p.add_argument("--reason", help="why (kept in the audit log)")
    json_flag(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("cancel", help="cancel a plan for good (its history is kept)")
    p.add_argument("plan_id")
    p.add_argument("--reason", required=True, help="why (kept in the audit log)")
    json_flag(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("opt-out", help="stop all sends to a user, from one plan or every plan")
    p.add_argument("user_id", help="the user's openid")
    p.add_argument("--plan", help="only this plan (default: every plan)")
    p.add_argument("--reason", required=True, help="why (kept in the audit log)")
    json_flag(p)
    p.set_defaults(func=cmd_opt_out)

    p = sub.add_parser("opt-in", help="undo an opt-out")
    p.add_argument("user_id")
    p.add_argument("--plan", help="the plan opted out of (default: the every-plan opt-out)")
    p.add_argument("--reason")
    json_flag(p)
    p.set_defaults(func=cmd_opt_in)

    p = sub.add_parser("stop-enrollment", help="end one user's timeline in a plan")
    p.add_argument("plan_id")
    p.add_argument("user_id")
    p.add_argument("--reason", required=True, help="why (kept in the audit log)")
    json_flag(p)
    p.set_defaults(func=cmd_stop_enrollment)

    p = sub.add_parser("status", help="what each plan (or one plan) is doing")
    p.add_argument("plan_id", nargs="?")
    p.add_argument("--next", type=int, default=5, help="how many next fire times (default 5)")
    json_flag(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("audit", help="admin actions and plan-file changes")
    p.add_argument("--plan", help="only this plan")
    p.add_argument("--user", help="only this user")
    p.add_argument("--limit", type=int, default=50, help="newest N events (default 50)")
    json_flag(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("reload", help="make every running daemon rescan its plans folder")
    p.set_defaults(func=cmd_reload)
