"""The user's commands, on a RunPod pod or on your own machine.

    python cli.py schema                               # JSON Schema of the job input
    python cli.py validate --input job.json            # check a job and its dataset; loads no weights
    python cli.py prefetch <base_model> [--revision R] # warm the volume's model cache
    python cli.py status <job_id>                      # the job's record (local SQLite records)

Each prints JSON on stdout. Exit codes: 0 ok, 1 the job failed, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _run_job(payload: dict[str, Any]) -> int:
    import handler

    output = handler.handler({"id": payload.get("job_id") or "cli", "input": payload})
    _print(output)
    if "error" not in output:
        return 0
    return 2 if output["error"].startswith("input:") else 1


def cmd_schema(args: argparse.Namespace) -> int:
    from config.job import job_json_schema

    _print(job_json_schema())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        document = json.loads(Path(args.input).read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.input}: {exc}", file=sys.stderr)
        return 2
    payload = document.get("input", document) if isinstance(document, dict) else document
    if not isinstance(payload, dict):
        print(f"{args.input} must hold a JSON object (the job input, or {{\"input\": …}})", file=sys.stderr)
        return 2
    return _run_job({**payload, "action": "validate"})


def cmd_prefetch(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"action": "prefetch", "base_model": args.base_model}
    if args.revision:
        payload["model_revision"] = args.revision
    return _run_job(payload)


def cmd_status(args: argparse.Namespace) -> int:
    from config.settings import WorkerSettings
    from storage.records import open_records

    records = open_records(WorkerSettings())
    row = records.get_job(args.job_id)
    if row is None:
        print(f"no record of job {args.job_id}", file=sys.stderr)
        return 1
    _print({"job": row, "artifact": records.get_artifact(args.job_id)})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("schema", help="print the JSON Schema of the job input").set_defaults(func=cmd_schema)

    p = sub.add_parser("validate", help="check a job input and its dataset without training")
    p.add_argument("--input", required=True, help="a JSON file: the job input, or {\"input\": …}")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("prefetch", help="put a base model into the volume's cache")
    p.add_argument("base_model", help="a Hugging Face repo id, or a folder under the models root")
    p.add_argument("--revision", help="a branch, tag or commit sha")
    p.set_defaults(func=cmd_prefetch)

    p = sub.add_parser("status", help="print a job's record from the local records")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
