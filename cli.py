"""The user's commands, on a RunPod pod or on your own machine.

    python cli.py schema [--markdown]                  # JSON Schema of the job input (or the README's table)
    python cli.py validate --input job.json            # check a job and its dataset; loads no weights
    python cli.py prefetch <base_model> [--revision R] # warm the volume's model cache
    python cli.py status <job_id>                      # the job's record (local SQLite records)
    python cli.py verify --adapter DIR_OR_URI --base DIR_OR_ID [--strict] [--json]
    python cli.py apply --adapter DIR_OR_URI --base DIR_OR_ID --prompt "..."
    python cli.py merge --adapter DIR_OR_URI --base DIR_OR_ID --out DIR
    python cli.py plan --base DIR_OR_ID --gpus 1x80 [--input job.json]  # memory plan from config.json only

Each prints JSON on stdout (verify prints its verdict in words unless --json; apply prints the text).
Exit codes: 0 ok, 1 the job failed, 2 bad usage or input, 3 the adapter does not fit the base (verify,
apply and merge refuse before loading any weights).
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
    from config.job import hyperparameters_markdown, job_json_schema

    if args.markdown:
        print(hyperparameters_markdown(), end="")
    else:
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
    from errors import scrub
    from storage.records import open_records

    records = open_records(WorkerSettings())
    row = records.get_job(args.job_id)
    if row is None:
        print(f"no record of job {args.job_id}", file=sys.stderr)
        return 1
    artifact = records.get_artifact(args.job_id)
    if artifact and artifact.get("download_urls"):
        # Presigned URLs are bearer credentials: say they exist, never print their signatures.
        artifact["download_urls"] = {name: scrub(url) for name, url in artifact["download_urls"].items()}
    _print({"job": row, "artifact": artifact})
    return 0


def _s3_settings(refs: list[str]):
    """WorkerSettings for an s3:// adapter; the URI's bucket stands in when S3_BUCKET is unset."""
    if not any(r.startswith("s3://") for r in refs):
        return None
    from pydantic import ValidationError

    from config.job import format_validation_error
    from config.settings import WorkerSettings
    from errors import InputError

    bucket = refs[0][len("s3://"):].split("/", 1)[0]
    try:
        # Endpoint and credentials from the environment; the bucket is the URI's, whatever S3_BUCKET says.
        return WorkerSettings(s3_bucket=bucket)
    except ValidationError as exc:
        raise InputError(f"S3 settings for {bucket}: {format_validation_error(exc)}") from None


def _checked_pair(args: argparse.Namespace, workdir: Path):
    """Verify the pair; print the verdict to stderr; return it (None: it does not fit → exit 3)."""
    from adapters.fetch import check_pair
    from adapters.verify import COMPATIBLE

    verdict, adapter, base = check_pair(args.adapter, args.base, workdir, revision=args.revision,
                                                 settings=_s3_settings(args.adapter))
    if verdict.exit_code(args.strict) != 0:
        print(verdict.render(), file=sys.stderr)
        return None
    if verdict.status != COMPATIBLE:
        print(verdict.render(), file=sys.stderr)
    return verdict, adapter, base


def _pair_command(func):
    """Run an adapter command in a scratch folder; our errors become one line: exit 2, or 1 (download)."""

    def run(args: argparse.Namespace) -> int:
        import tempfile

        from errors import WorkerError, scrub

        try:
            with tempfile.TemporaryDirectory(prefix="lora-adapter-") as workdir:
                return func(args, Path(workdir))
        except WorkerError as exc:
            label = exc.stage if exc.stage in ("input", "model") else "download"
            message = scrub(f"{label}: {exc.message}")
            print(message, file=sys.stderr)
            code = 2 if exc.stage in ("input", "model") else 1
            if getattr(args, "json", False):
                _print({"verdict": None, "error": message, "exit_code": code})
            return code

    return run


@_pair_command
def cmd_verify(args: argparse.Namespace, workdir: Path) -> int:
    from adapters.fetch import check_pair

    verdict, _, _ = check_pair(args.adapter, args.base, workdir, revision=args.revision,
                                        settings=_s3_settings(args.adapter))
    if args.json:
        _print(verdict.to_dict(args.strict))
    else:
        print(verdict.render())
    return verdict.exit_code(args.strict)


@_pair_command
def cmd_apply(args: argparse.Namespace, workdir: Path) -> int:
    from adapters.apply import generate, load_adapted

    checked = _checked_pair(args, workdir)
    if checked is None:
        return 3
    _, adapter, base = checked
    model, tokenizer = load_adapted(adapter.folder, base.folder, device=args.device, dtype=args.dtype)
    out = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                            chat=False if args.no_chat_template else None, temperature=args.temperature,
                            seed=args.seed)
    if args.json:
        _print({"text": out.text, "token_ids": out.token_ids, "prompt": out.prompt_text})
    else:
        print(out.text)
    return 0


@_pair_command
def cmd_merge(args: argparse.Namespace, workdir: Path) -> int:
    from adapters.apply import merge_adapter

    out = Path(args.out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"--out {out} exists and is not empty; name a new folder", file=sys.stderr)
        return 2
    checked = _checked_pair(args, workdir)
    if checked is None:
        return 3
    verdict, adapter, base = checked
    if out.is_dir():
        out.rmdir()  # empty: the merged model is renamed into its place
    manifest = merge_adapter(adapter, base, out, verdict, dtype=args.dtype)
    _print({"out": str(out), "verdict": verdict.status, "files": manifest["files"]})
    return 0


def _pair_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, action="append",
                   help="the adapter: a folder, s3://bucket/prefix/adapter/, or https URLs of its files "
                        "(repeat --adapter for one presigned URL per file)")
    p.add_argument("--base", required=True,
                   help="the base model: a folder, or a Hugging Face repo id in the local cache (offline)")
    p.add_argument("--revision", help="with a repo id: the branch, tag or commit in the cache")
    p.add_argument("--strict", action="store_true",
                   help="refuse (exit 3) an adapter trained on other weights of the same architecture")


def _gpus(text: str) -> list[int]:
    """'1x80' → one GPU of 80 GiB; '4x80', '1x141'."""
    count, sep, size = text.lower().partition("x")
    try:
        n, gib = int(count), float(size)
    except ValueError:
        n, gib = 0, 0
    if not sep or n < 1 or gib <= 0:
        raise argparse.ArgumentTypeError(f"--gpus must be COUNTxGiB, e.g. 1x80 or 4x80; got {text!r}")
    return [int(gib * 1024**3)] * n


def _config_folder(base: str) -> Path:
    """A folder with the model's config.json: the folder given, or config.json alone from the Hub."""
    folder = Path(base).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(base, "config.json")).parent


def plan_in_words(plan) -> str:
    gib = 1024**3
    where = f"{len(plan.device_bytes)} GPU(s) of {min(plan.device_bytes) / gib:.0f} GiB"
    lines = [f"{'FITS' if plan.fits else 'DOES NOT FIT'} on {where}: {plan.summary()}",
             "per device, by group (weights):"]
    for name, group in plan.groups.items():
        if group.parameters:
            note = " (4-bit)" if group.quantized_parameters == group.parameters else (
                " (partly 4-bit)" if group.quantized_parameters else "")
            lines.append(f"  {name:18} {group.parameters / 1e9:8.3f} B params  {group.bytes / gib:8.2f} GiB{note}")
    lines += [f"  {'lora+optimizer':18} {plan.lora_bytes / gib:28.2f} GiB",
              f"  {'activations':18} {plan.activation_bytes / gib:28.2f} GiB",
              f"  {'expert dequant':18} {plan.expert_dequant_bytes / gib:28.2f} GiB"]
    if plan.alternatives:
        lines.append("what would fit: " + "; ".join(plan.alternatives))
    if plan.expert_lora:
        lines.append(plan.expert_lora)
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from config.job import TrainingJob
    from errors import WorkerError

    try:
        payload: dict[str, Any] = {"dataset": "plan-only.jsonl"}
        if args.input:
            document = json.loads(Path(args.input).read_text())
            payload = document.get("input", document) if isinstance(document, dict) else payload
        hp = TrainingJob.from_payload({**payload, "dataset": payload.get("dataset") or "plan-only.jsonl"})
        from training.memory_plan import plan_memory
        from training.plan_shape import model_skeleton

        folder = _config_folder(args.base)
        # Read once, planned three ways; from config.json alone for the families the worker knows (no
        # torch import: the answer comes in well under a second), else built on the meta device.
        skeleton = model_skeleton(folder)
        plan = plan_memory(folder, hp.hyperparameters, cuda=True, devices=args.gpus, skeleton=skeleton)
        options = {}  # 'auto' picks one; the user sees both verdicts
        for quantization in ("none", "4bit") if hp.hyperparameters.quantization == "auto" else ():
            other = plan_memory(folder, hp.hyperparameters.model_copy(update={"quantization": quantization}),
                                cuda=True, devices=args.gpus, skeleton=skeleton)
            options[quantization] = {"fits": other.fits, "strategy": other.strategy,
                                     "per_device_gib": round(other.per_device_bytes / 1024**3, 1)}
    except (OSError, ValueError, WorkerError) as exc:
        print(f"cannot plan {args.base}: {exc}", file=sys.stderr)
        return 2
    _print({**plan.to_dict(), **({"options": options} if options else {})})
    for quantization, option in options.items():
        name = "16-bit (quantization 'none')" if quantization == "none" else "4-bit (quantization '4bit')"
        print(f"{name}: {option['per_device_gib']} GiB per GPU, {'fits' if option['fits'] else 'does not fit'}")
    print(plan_in_words(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schema", help="print the JSON Schema of the job input")
    p.add_argument("--markdown", action="store_true",
                   help="print the hyperparameter table instead (README.md holds a copy of it)")
    p.set_defaults(func=cmd_schema)

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

    p = sub.add_parser("verify", help="does an adapter fit a base? (reads headers only; no weights)")
    _pair_arguments(p)
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("plan", help="will a job fit these GPUs? (from config.json alone; no weights)")
    p.add_argument("--base", required=True, help="a model folder, or a Hub repo id (only config.json is fetched)")
    p.add_argument("--gpus", required=True, type=_gpus, help="COUNTxGiB, e.g. 1x80 (one 80 GiB GPU)")
    p.add_argument("--input", help="a job input JSON file (its hyperparameters are planned; default: defaults)")
    p.set_defaults(func=cmd_plan)

    for name, text in (("apply", "verify, then generate with base + adapter"),
                       ("merge", "verify, then merge the adapter into a standalone model")):
        p = sub.add_parser(name, help=text)
        _pair_arguments(p)
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights dtype (auto: as saved)")
        if name == "apply":
            p.add_argument("--prompt", required=True)
            p.add_argument("--max-new-tokens", type=int, default=128)
            p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
            p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature)")
            p.add_argument("--no-chat-template", action="store_true",
                           help="send the prompt as is, even if the base has a chat template")
            p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
            p.add_argument("--json", action="store_true", help="print text and token ids as JSON")
            p.set_defaults(func=cmd_apply)
        else:
            p.add_argument("--out", required=True, help="a new folder for the merged model")
            p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
