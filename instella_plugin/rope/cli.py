"""``instella rope``: the RoPE base for a target context from the scaling law (see ``scaling``).

    instella rope --train-context 4096 --base 10000 --target 65536     # prints 514640
    instella rope --target 65536 262144 --json                          # several targets, as JSON
"""
import argparse
import json

from instella_plugin.rope.scaling import rope_base_for_context


def _context(text: str) -> int:
    """A context length: an integer, optionally with a K suffix (64K = 65536)."""
    t = text.strip().upper()
    try:
        return int(t[:-1]) * 1024 if t.endswith("K") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a context length: {text!r} (use an integer like 65536 or 64K)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=_context, nargs="+", required=True,
                   help="target context length(s) in tokens (65536 or 64K)")
    p.add_argument("--train-context", type=_context, default=4096, help="context the model was trained at (4096)")
    p.add_argument("--base", type=float, default=10000.0, help="RoPE base (theta) at the training context (10000)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args: argparse.Namespace) -> int:
    rows = []
    for target in args.target:
        try:
            theta = rope_base_for_context(target, args.train_context, args.base)
        except ValueError as e:
            raise SystemExit(f"instella rope: {e}")
        rows.append({"train_context": args.train_context, "base": args.base, "target": target,
                     "theta": theta, "theta_rounded": round(theta)})
    if args.json:
        print(json.dumps(rows, indent=1))
    elif len(rows) == 1:
        print(rows[0]["theta_rounded"])
    else:
        print(f"{'target':>10}  {'theta':>16}  (trained at {args.train_context}, base {args.base:g})")
        for r in rows:
            print(f"{r['target']:>10}  {r['theta']:>16.1f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="instella rope", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))
