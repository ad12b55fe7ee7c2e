"""The `llamesh` command: the composition root that wires roles together.

Each subcommand builds its settings once (config file, secrets, `LLAMESH_*` overrides) and hands them
down. It is the only module allowed to import every role; the roles never import each other.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from llamesh_api import config, loading


def _add_config_args(parser: argparse.ArgumentParser, *, cookbook: bool) -> None:
    parser.add_argument("--config", type=Path, help="node config (config.yaml); embedded defaults if omitted")
    parser.add_argument("--secrets", type=Path, help="secrets.yaml whose sections replace config.yaml's")
    if cookbook:
        parser.add_argument("--cookbook", type=Path, required=True, help="models and profiles (cookbook.yaml)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamesh", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check config.yaml and cookbook.yaml, print every problem")
    _add_config_args(validate, cookbook=True)

    build = commands.add_parser("build-llama", help="build (or reuse) llama-server and print its path")
    _add_config_args(build, cookbook=False)
    build.add_argument("--force", action="store_true", help="rebuild even when a finished build exists")

    convert = commands.add_parser("cookbook-to-k8s", help="print a cookbook's models as LlamaModel manifests")
    convert.add_argument("cookbook", type=Path, help="cookbook.yaml")
    convert.add_argument("--namespace", help="put the LlamaModels in this namespace (default: kubectl's)")

    crds_command = commands.add_parser("crds", help="print the CustomResourceDefinitions (or write them to a folder)")
    crds_command.add_argument("--write", type=Path, metavar="DIR", help="write one file per CRD into DIR")

    for name, text in (
        ("serve", "run gateway, agent and operator in one process on YAML files (bare metal)"),
        ("operator", "run the Kubernetes operator"),
        ("agent", "run the node agent"),
        ("gateway", "run the OpenAI gateway"),
    ):
        sub = commands.add_parser(name, help=text)
        _add_config_args(sub, cookbook=name == "serve")
        if name != "serve":
            sub.add_argument(
                "--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG or ~/.kube/config)"
            )
            sub.add_argument("--namespace", help="namespace of LlamaModels and LlamaInstances (default: the context's)")
        if name in ("operator", "agent"):
            sub.add_argument("--health-port", type=int, help="serve GET /healthz and /readyz on this port (probes)")
    return parser


def _config_dir(args: argparse.Namespace) -> Path:
    return args.config.parent.resolve() if args.config is not None else Path.cwd()


def _load_config(args: argparse.Namespace) -> config.NodeConfig:
    return loading.load_node_config(args.config, secrets_path=args.secrets)


def _validate(args: argparse.Namespace) -> int:
    problems: list[loading.Problem] = []
    node_config: config.NodeConfig | None = None
    try:
        node_config = _load_config(args)
    except loading.ConfigError as exc:
        problems += exc.problems
    try:
        book = loading.load_cookbook(args.cookbook)
    except loading.ConfigError as exc:
        problems += exc.problems
    else:
        if node_config is not None:
            problems += loading.cross_check(
                node_config,
                book,
                config_source=str(args.config or "<defaults>"),
                cookbook_source=str(args.cookbook),
            )
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"ok: {args.config or '<defaults>'} and {args.cookbook} are valid")
    return 0


def _build_llama(args: argparse.Namespace) -> int:
    from llamesh_agent import build

    node_config = _load_config(args)
    manager = build.BuildManager(node_config.llama_cpp, base_dir=_config_dir(args))
    try:
        result = asyncio.run(manager.build(force=args.force) if args.force else manager.ensure_binary())
    except build.BuildError as exc:
        print(f"error: llama.cpp build failed: {exc}", file=sys.stderr)
        return 1
    state = "reused" if result.reused else "built"
    print(f"llama-server {state}: {result.binary_path} (llama.cpp {result.llama_cpp_version})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from llamesh_operator import logsetup, serve

    node_config = _load_config(args)
    logsetup.configure(node_config, config_dir=_config_dir(args))
    return serve.run(node_config, cookbook_path=args.cookbook.resolve(), config_dir=_config_dir(args))


def _crds(args: argparse.Namespace) -> int:
    import yaml

    from llamesh_api import crds

    rendered = crds.render_all()
    if args.write is None:
        print(yaml.safe_dump_all(rendered, sort_keys=False), end="")
        return 0
    args.write.mkdir(parents=True, exist_ok=True)
    for crd in rendered:
        path = args.write / f"{crd['metadata']['name']}.yaml"
        path.write_text(crds.HEADER + yaml.safe_dump(crd, sort_keys=False))
        print(f"wrote {path}")
    return 0


def _cookbook_to_k8s(args: argparse.Namespace) -> int:
    from llamesh_operator import cookbook_k8s

    book = loading.load_cookbook(args.cookbook)
    try:
        print(cookbook_k8s.render(book, namespace=args.namespace), end="")
    except cookbook_k8s.ConversionError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    return 0


def _kubernetes_role(args: argparse.Namespace) -> int:
    from llamesh_operator import kopf_operator, kube_roles, logsetup, serve

    node_config = _load_config(args)
    logsetup.configure(node_config, config_dir=_config_dir(args))
    where = {"kubeconfig": args.kubeconfig, "namespace": args.namespace}
    if args.command == "operator":
        return serve.run_main(kopf_operator.operator(node_config, health_port=args.health_port, **where))
    if args.command == "agent":
        config_dir = _config_dir(args)
        return serve.run_main(
            kube_roles.agent(node_config, config_dir=config_dir, health_port=args.health_port, **where)
        )
    return serve.run_main(kube_roles.gateway(node_config, **where))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "validate": _validate,
        "build-llama": _build_llama,
        "serve": _serve,
        "crds": _crds,
        "cookbook-to-k8s": _cookbook_to_k8s,
    }
    handler = handlers.get(args.command, _kubernetes_role)
    try:
        return handler(args)
    except loading.ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
