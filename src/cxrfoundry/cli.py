"""The ``cxrfoundry`` command: audit, reproduce, install-profile, launch.

    cxrfoundry audit [--directory .] [--out results/audit] [--configfile F] [--target T]
    cxrfoundry reproduce TARGET [--configfile F] [--cores N] [--scratch DIR] [--out DIR]
    cxrfoundry install-profile [--cpu-partition P] [--gpu-partition G] [--account A] ...
    cxrfoundry launch [--gpus N] [--nodes M] -- -m MODULE ARGS

``audit`` and ``reproduce`` exit 1 when the audit fails (a tampered output, a broken chain, an
output that does not reproduce) and write ``audit.json`` + ``audit.md`` (``reproduce.json`` +
``reproduce.md``) into ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def _audit(args: argparse.Namespace) -> int:
    from cxrfoundry.audit import audit, summarize, write_report

    report = audit(
        args.directory,
        check_raw=not args.skip_raw_files,
        stale=not args.no_stale,
        strict=args.strict,
        snakefile=args.snakefile,
        configfiles=[Path(c) for c in args.configfile],
        target=args.target,
    )
    out = args.out if args.out.is_absolute() else Path(args.directory) / args.out
    json_path, md_path = write_report(report, out)
    if report.findings:
        print(summarize(report.findings))
    verdict = "PASS" if report.ok else "FAIL"
    print(f"audit {verdict}: {len(report.errors)} errors, {len(report.stale)} stale; "
          f"report: {md_path} and {json_path}")  # fmt: skip
    return 0 if report.ok else 1


def _reproduce(args: argparse.Namespace) -> int:
    from cxrfoundry.audit import AuditReport, reproduce, write_report

    result = reproduce(
        args.target,
        args.directory,
        scratch=args.scratch,
        configfiles=args.configfile,
        cores=args.cores,
        keep_scratch=args.keep_scratch,
        workflow_dir=args.snakefile.parent if args.snakefile else None,
    )
    report = AuditReport(workdir=str(Path(args.directory).resolve()), reproductions=[result])
    out = args.out if args.out.is_absolute() else Path(args.directory) / args.out
    json_path, md_path = write_report(report, out)
    for cmp in result["comparisons"]:
        print(f"{cmp['result']:>16}  {cmp['path']}  ({cmp['detail']})")
    if result.get("error"):
        print(result["error"], file=sys.stderr)
    print(f"reproduce {'OK' if result['ok'] else 'FAILED'}; report: {md_path} and {json_path}")
    return 0 if result["ok"] else 1


def _install_profile(args: argparse.Namespace) -> int:
    from cxrfoundry.cluster import install_profile, site_profile_root

    dest_root = args.dest or (site_profile_root() if args.system else None)
    path = install_profile(
        source=args.source,
        dest_root=dest_root,
        name=args.name,
        cpu_partition=args.cpu_partition,
        gpu_partition=args.gpu_partition,
        max_gpus_per_node=args.max_gpus_per_node,
        partitions_file=args.partitions_file,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        gpu_model=args.gpu_model,
        settings=args.set,
        resources=args.resource,
        force=args.force,
    )
    print(f"installed profile at {path}; run: snakemake --profile {args.name}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from cxrfoundry.train.launch import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cxrfoundry`` command."""
    parser = argparse.ArgumentParser(prog="cxrfoundry", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("audit", help="verify outputs and lineage; list stale results")
    p.add_argument("--directory", "-d", default=".", help="the workflow's working directory")
    # Not results/audit itself: that folder holds the `audit` rule's own outputs.
    p.add_argument("--out", type=Path, default=Path("results/audit/cli"), help="report folder")
    p.add_argument("--snakefile", type=Path, help="the workflow (default: found as for reproduce)")
    p.add_argument("--strict", action="store_true", help="stale outputs fail the audit too")
    p.add_argument("--configfile", action="append", default=[], help="as given to snakemake")
    p.add_argument("--target", help="audit only the ancestry of this output")
    p.add_argument("--skip-raw-files", action="store_true", help="do not rehash raw files")
    p.add_argument("--no-stale", action="store_true", help="skip the staleness check")
    p.set_defaults(func=_audit)

    p = sub.add_parser("reproduce", help="rebuild TARGET from its recorded inputs and compare")
    p.add_argument("target")
    p.add_argument("--directory", "-d", default=".")
    p.add_argument("--configfile", action="append", default=[])
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--scratch", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep-scratch", action="store_true")
    p.add_argument(
        "--snakefile", type=Path, help="the workflow (default: the run's or this checkout's)"
    )
    p.add_argument("--out", type=Path, default=Path("results/audit/reproduce"))
    p.set_defaults(func=_reproduce)

    p = sub.add_parser(
        "install-profile", help="install profiles/slurm where `snakemake --profile slurm` finds it"
    )
    p.add_argument("--source", type=Path, help="profile folder (default: the checkout's)")
    p.add_argument("--name", default="slurm", help="profile name (default: slurm)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--dest", type=Path, help="folder to install into (default: per user)")
    where.add_argument("--system", action="store_true", help="install for all users (/etc/xdg)")
    p.add_argument("--cpu-partition", help="partition for CPU jobs")
    p.add_argument("--gpu-partition", help="partition for jobs with gpu > 0")
    p.add_argument("--max-gpus-per-node", type=int, default=8)
    p.add_argument("--partitions-file", type=Path, help="plugin partition-limits YAML")
    p.add_argument("--account", help="Slurm account (-A) for every job")
    p.add_argument("--qos", help="Slurm QoS for every job")
    p.add_argument("--constraint", help="node constraint (-C) for every job")
    p.add_argument("--gpu-model", help="GPU model for GPU rules (--gpus=MODEL:N)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FLAG=VALUE",
        help="any profile key, e.g. slurm-status-command=sacct",
    )
    p.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="RULE:KEY=VALUE",
        help="a rule's resource (RULE '*': every job), e.g. pretrain_clip:gpu=4",
    )
    p.add_argument("--force", action="store_true", help="replace an existing installation")
    p.set_defaults(func=_install_profile)

    p = sub.add_parser("launch", help="run a training entry point on this job's GPUs/nodes")
    from cxrfoundry.train.launch import add_arguments

    add_arguments(p)
    p.set_defaults(func=_launch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxrfoundry`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, LookupError, ValueError) as exc:
        print(f"cxrfoundry {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
