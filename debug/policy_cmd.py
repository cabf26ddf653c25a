"""``carapace-debug policy``: try requests against a policy file, and lint it.

Both commands call the server's own engine (:mod:`carapace.server.policy`),
so what ``check`` prints is what the server would decide. They work on a file
and need no running server. Secret references in the policy are neither read
nor run unless ``check --resolve`` asks for it (then as the server would).

Exit codes: ``check`` exits 0 for allow, 1 for deny, 2 if the policy does not
load or the command line is wrong; ``lint`` exits 0 with no warnings, 1 with
warnings, 2 if the policy does not load.
"""

from __future__ import annotations

import json
import os
from typing import NoReturn

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table
from rich.text import Text

from carapace.server.policy import (
    CliDecision,
    CliTool,
    Decision,
    McpTool,
    Policy,
    PolicyError,
    SecretResolver,
    decide_cli,
    decide_http,
    decide_mcp_request,
    decide_mcp_session,
    lint_policy,
    load_policy_file,
    resolve_policy,
)

POLICY_ENV = "CARAPACE_POLICY_FILE"
_POLICY_SUFFIXES = (".yaml", ".yml", ".json")


def _fail_load(message: str, as_json: bool) -> NoReturn:
    """Report a policy that cannot be used and exit 2."""
    if as_json:
        click.echo(json.dumps({"error": message}))
    else:
        click.echo(f"error: {message}", err=True)
    raise SystemExit(2)


def _load(path: str, as_json: bool) -> Policy:
    try:
        return load_policy_file(path)
    except PolicyError as exc:
        _fail_load(str(exc), as_json)


def _resolve(loaded: Policy, as_json: bool) -> Policy:
    """Resolve the secret references as the server would (its environment, systemd's
    $CREDENTIALS_DIRECTORY, commands run): exit 2, naming the reference, if one fails."""
    try:
        return resolve_policy(loaded, SecretResolver.from_environment(os.environ))
    except PolicyError as exc:
        _fail_load(str(exc), as_json)


def _tool_refs(loaded: Policy, tool: str) -> dict[str, str]:
    """The unresolved secret references of ``tool``, by key path (never a value)."""
    prefix = f"tools.{tool}."
    return {path: str(ref) for path, ref in loaded.unresolved_refs().items()
            if path.startswith(prefix)}


def _looks_like_policy(arg: str) -> bool:
    return arg.endswith(_POLICY_SUFFIXES) or os.sep in arg or os.path.isfile(arg)


def _split_policy(
    ctx: click.Context, args: tuple[str, ...], policy_opt: str | None, as_json: bool
) -> tuple[str, list[str]]:
    """Which positional is the policy file, and which are the tool's argv.

    ``--policy`` on the command line makes every positional argv. Otherwise
    the first positional is the policy if it looks like a path (ends in
    .yaml/.yml/.json, contains '/', or is an existing file); failing that,
    the policy comes from ``$CARAPACE_POLICY_FILE``.
    """
    explicit = ctx.get_parameter_source("policy_opt") == ParameterSource.COMMANDLINE
    if explicit and policy_opt:
        return policy_opt, list(args)
    if args and (_looks_like_policy(args[0]) or not policy_opt):
        return args[0], list(args[1:])
    if policy_opt:
        return policy_opt, list(args)
    _fail_load(f"no policy file: pass POLICY, --policy FILE or set {POLICY_ENV}", as_json)


def _parse_headers(raw: tuple[str, ...]) -> list[tuple[bytes, bytes]]:
    headers = []
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise click.UsageError(f"--header {item!r} is not 'Name: value'")
        headers.append((name.strip().encode("utf-8"), value.strip().encode("utf-8")))
    return headers


def _parse_env(raw: tuple[str, ...]) -> list[tuple[bytes, bytes]]:
    env = []
    for item in raw:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.UsageError(f"--env {item!r} is not NAME=VALUE")
        env.append((os.fsencode(name), os.fsencode(value)))
    return env


def _print_decision(decision: Decision, console: Console) -> None:
    verdict = Text("ALLOW", style="bold green") if decision.allow else Text(
        "DENY", style="bold red"
    )
    console.print(Text.assemble(verdict, "  ", decision.reason))
    console.print(Text.assemble(("rule: ", "dim"), decision.rule))
    if decision.needs_approval:
        console.print(Text.assemble(("waits for a person: ", "bold yellow"), decision.approval))
    if isinstance(decision, CliDecision) and decision.allow:
        argv = " ".join(os.fsdecode(a) for a in decision.argv)
        console.print(Text.assemble(("exec: ", "dim"), argv))
        console.print(Text.assemble(("cwd:  ", "dim"), os.fsdecode(decision.cwd)))
        # Names only: injected values may be secrets.
        names = ", ".join(sorted(os.fsdecode(k) for k in decision.env))
        console.print(Text.assemble(("env:  ", "dim"), names))


@click.group("policy")
def policy() -> None:
    """Check requests against a policy file and lint it (the server's own engine)."""


@policy.command("check", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("args", nargs=-1, metavar="[POLICY] [-- ARGV...]")
@click.option("--policy", "policy_opt", envvar=POLICY_ENV, metavar="FILE",
              help=f"Policy file (default ${POLICY_ENV}); given here, every positional is ARGV.")
@click.option("--tool", required=True, help="Tool name as in the policy.")
@click.option("--agent", default="default", show_default=True, help="Agent asking.")
@click.option("--http", "http", nargs=2, metavar="METHOD PATH",
              help="Check an HTTP request instead of a command line.")
@click.option("--body", default=None, help="HTTP request body (JSON text) for --http.")
@click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'",
              help="HTTP request header for --http (repeatable).")
@click.option("--cwd", default=None,
              help="Working directory of the command (default: the first cwd_allowed "
                   "entry, else /).")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Environment variable the VM sends (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--resolve", is_flag=True,
              help="Also resolve the policy's secret references ({file:}, {credential:}, "
              "{env:}, {command:}: commands RUN) as the server would, exiting 2 if one "
              "fails. Without it nothing is read or run, and the decision lists them unresolved.")
@click.option("--mcp", "mcp_method", default=None, metavar="METHOD",
              help="Check one MCP request (tools/call, resources/read, prompts/get, ...) to "
              "a type: mcp tool instead of a command line.")
@click.option("--params", "mcp_params", default=None, metavar="JSON",
              help="The MCP request's params for --mcp, e.g. "
              "'{\"name\": \"get_me\", \"arguments\": {}}'.")
@click.pass_context
def check(
    ctx: click.Context,
    args: tuple[str, ...],
    policy_opt: str | None,
    tool: str,
    agent: str,
    http: tuple[str, str] | None,
    body: str | None,
    headers: tuple[str, ...],
    cwd: str | None,
    env: tuple[str, ...],
    as_json: bool,
    resolve: bool = False,
    mcp_method: str | None = None,
    mcp_params: str | None = None,
) -> None:
    """Decide one request: exit 0 if allowed, 1 if denied, 2 if the policy is unusable.

    The first positional is the policy file if it ends in .yaml/.yml/.json,
    contains a '/' or is an existing file; otherwise the policy comes from
    --policy or $CARAPACE_POLICY_FILE and every positional is ARGV.

    \b
    carapace-debug policy check POLICY --tool op -- item get foo
    carapace-debug policy check POLICY --tool signal-cli --http POST /api/v1/rpc \\
        --body '{"jsonrpc":"2.0","method":"send","params":{"recipient":["+15551234567"]}}'
    carapace-debug policy check POLICY --tool github --mcp tools/call \\
        --params '{"name":"get_me","arguments":{}}'
    """
    path, argv = _split_policy(ctx, args, policy_opt, as_json)
    loaded = _load(path, as_json)
    if resolve:
        loaded = _resolve(loaded, as_json)
    refs = _tool_refs(loaded, tool)
    decision: Decision
    if mcp_method is not None:
        if argv or http or body is not None or headers or env or cwd is not None:
            raise click.UsageError("--mcp takes only --params")
        decision = _check_mcp(loaded, agent, tool, mcp_method, mcp_params)
    elif mcp_params is not None:
        raise click.UsageError("--params needs --mcp METHOD")
    elif http:
        if argv:
            raise click.UsageError("ARGV makes no sense with --http")
        if env or cwd is not None:
            raise click.UsageError("--env and --cwd apply to command-line tools, not --http")
        method, target = http
        decision = decide_http(
            loaded, agent, tool, method, target, _parse_headers(headers),
            (body or "").encode("utf-8"),
        )
    else:
        if body is not None or headers:
            raise click.UsageError("--body and --header need --http METHOD PATH")
        if cwd is None:
            spec = loaded.tools.get(tool)
            allowed = spec.cwd_allowed if isinstance(spec, CliTool) else None
            cwd = allowed[0] if allowed else "/"
        decision = decide_cli(
            loaded, agent, tool, [os.fsencode(a) for a in argv], os.fsencode(cwd),
            _parse_env(env),
        )
    if as_json:
        click.echo(json.dumps({**decision.as_dict(), **({"unresolved_refs": refs} if refs
                                                          else {})}))
    else:
        console = Console(highlight=False, soft_wrap=True)
        _print_decision(decision, console)
        for key, ref in refs.items():
            console.print(Text.assemble(("ref:  ", "dim"), f"{key} = {ref} (not resolved; "
                                        "--resolve to resolve it)"))
    ctx.exit(0 if decision.allow else 1)


def _check_mcp(loaded: Policy, agent: str, tool: str, method: str,
               raw: str | None) -> Decision:
    """The session's verdict if the agent may not start one, else the request's."""
    try:
        params = json.loads(raw) if raw is not None else {}
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from None
    session = decide_mcp_session(loaded, agent, tool, [])
    spec = loaded.tools.get(tool)
    if not session.allow or not isinstance(spec, McpTool):
        return session
    return decide_mcp_request(spec, method, params).decision


def _binary_problem(path: str) -> str | None:
    """Why a CLI tool's binary cannot run on this host, or None."""
    if not os.path.exists(path):
        return "does not exist"
    if not os.path.isfile(path):
        return "is not a regular file"
    if not os.access(path, os.X_OK):
        return "is not executable"
    return None


@policy.command("lint", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", required=False, metavar="[POLICY]")
@click.option("--policy", "policy_opt", envvar=POLICY_ENV, metavar="FILE",
              help=f"Policy file (default ${POLICY_ENV}).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of {tool, level, message}.")
@click.pass_context
def lint(ctx: click.Context, path: str | None, policy_opt: str | None, as_json: bool) -> None:
    """Warn about risky or useless rules: exit 0 if none, 1 if any, 2 if unusable."""
    chosen = path or policy_opt
    if not chosen:
        _fail_load(f"no policy file: pass POLICY, --policy FILE or set {POLICY_ENV}", as_json)
    loaded = _load(chosen, as_json)
    warnings = lint_policy(loaded, binary_problem=_binary_problem)
    if as_json:
        click.echo(json.dumps([w.as_dict() for w in warnings]))
    else:
        console = Console(highlight=False, soft_wrap=True)
        if not warnings:
            console.print(Text(f"{chosen}: no warnings", style="green"))
        else:
            table = Table("level", "tool", "message", title=chosen, title_justify="left")
            for w in warnings:
                style = "red" if w.level == "error" else "yellow"
                table.add_row(Text(w.level, style=style), Text(w.tool or "-"), Text(w.message))
            console.print(table)
    ctx.exit(1 if warnings else 0)
