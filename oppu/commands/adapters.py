"""``oppu adapters``: a user's adapter versions: list them, roll back, export and import PEFT folders.

    oppu adapters list     --run DIR --user U [--variant V]
    oppu adapters rollback --run DIR --user U --to VERSION [--variant V]
    oppu adapters export   --run DIR --user U --out DIR2 [--variant V] [--version X]
    oppu adapters import   --run DIR --user U --from DIR2 [--variant V] [--max-lora-rank R]
                           [--target-modules M1,M2,...]

The run config is ``--config``, else ``DIR/config.yaml``, with ``--set`` overrides (``store=...``,
``users.keep_versions=...``); ``--variant`` defaults to its first variant (every variant for
``list``). ``list`` prints one JSON object a line per version, oldest first: ``version``,
``created``, ``trainer``, ``data_range`` (the manifest's span of history trained on), ``current``
(the one served) and ``variant``. ``rollback`` and ``import`` print the now-current version's line.
Exit status 2 for an unknown run, user, variant or version, or an adapter ``import`` refuses
(the message names what is wrong); 1 for a store fault.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = ("A user's adapter versions: list them (list), make an older one current (rollback), write "
        "one as a PEFT folder (export), publish a PEFT LoRA folder as a new version (import).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from oppu.config import add_config_arguments
    from oppu.serving.config import ServeConfig

    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    helps = {
        "list": "one JSON line per version of the user's adapter: version, created, trainer, data_range, "
                "current, variant",
        "rollback": "make an older version current (a later publish is current again); serving follows "
                    "within its adapter_check_ttl_s",
        "export": "write a version as a standard PEFT folder (adapter_config.json, adapter_model.safetensors) "
                  "that PeftModel.from_pretrained, vLLM and Ray Serve LLM load",
        "import": "check a PEFT LoRA folder against the run's base and the serving limits, then publish it "
                  "as a new, current version (trainer 'import')",
    }
    for action, help_text in helps.items():
        sub = actions.add_parser(action, help=help_text, description=help_text)
        sub.add_argument("--run", required=True, help="the run directory (a path or s3://...)")
        sub.add_argument("--user", required=True, help="user id: 1-128 letters, digits, '.', '_', '-'")
        sub.add_argument("--variant", help="adapter variant (default: the run config's first; list: every one)")
        add_config_arguments(sub)
        if action == "rollback":
            sub.add_argument("--to", required=True, metavar="VERSION", help="the version to make current "
                             "(oppu adapters list shows them)")
        elif action == "export":
            sub.add_argument("--out", required=True, help="the folder to write (a path or s3://...); one "
                             "folder per adapter, holding no adapter yet")
            sub.add_argument("--version", help="the version to export (default: the current one)")
        elif action == "import":
            sub.add_argument("--from", dest="source", required=True,
                             help="a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)")
            fields = ServeConfig.model_fields
            sub.add_argument("--max-lora-rank", type=int, default=fields["max_lora_rank"].default,
                             help="the serve app's max_lora_rank (default: %(default)s)")
            sub.add_argument("--target-modules", default=",".join(fields["target_modules"].default_factory()),
                             help="the serve app's target_modules, comma-separated (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from oppu import user_adapters
    from oppu.commands.users import load_run_config
    from oppu.errors import ConfigError, UserIdError
    from oppu.ids import validate_user_id

    try:
        user = validate_user_id(args.user)
    except UserIdError as exc:
        raise ConfigError(f"--user: {exc}") from None
    cfg = load_run_config(args.run, args.config, args.overrides)
    if args.variant is not None:
        from oppu.run_config import parse_variant

        parse_variant(args.variant)  # ConfigError naming the spellings
    variant = args.variant or cfg.users.variants[0]
    if args.action == "list":
        for row in user_adapters.list_versions(cfg, user, [args.variant] if args.variant else cfg.users.variants):
            print(json.dumps(row))
        return 0
    if args.action == "rollback":
        manifest = user_adapters.rollback_version(cfg, user, variant, args.to)
    elif args.action == "export":
        manifest = user_adapters.export_adapter(cfg, user, variant, args.out, args.version)
        print(f"user {user!r} {variant} version {manifest.version} written to {args.out} (base_model_name_or_path "
              f"{user_adapters.base_uri(cfg, variant)})", file=sys.stderr)
        return 0
    else:
        targets = [name.strip() for name in args.target_modules.split(",") if name.strip()]
        manifest = user_adapters.import_adapter(cfg, user, variant, args.source, max_lora_rank=args.max_lora_rank,
                                                target_modules=targets)
    print(json.dumps(user_adapters.version_row(manifest, current=True)))
    return 0
