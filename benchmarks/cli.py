"""`n4 bench ...` and `n4 plan` subcommands (registered by n4/cli.py). Imports stay lazy: `kernels` must set up the
Triton interpreter before triton is imported when there is no GPU."""
from __future__ import annotations


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    kernels = bench_sub.add_parser("kernels", help="each Triton kernel vs its reference and torch built-ins")
    kernels.add_argument("--reduced", action="store_true",
                         help="tiny shapes (the CPU/interpreter mode; the default without CUDA)")
    kernels.add_argument("--only", default=None, help="comma-separated kernel names to run")
    kernels.add_argument("--iters", type=int, default=None,
                         help="timed calls per measurement (CUDA: half as many per CUDA graph)")
    kernels.add_argument("--json", default=None, help="write the rows here too")
    kernels.set_defaults(func=_run_kernels)

    from benchmarks import serve, throughput  # argparse only at import; torch/httpx load when a command runs
    throughput_parser = bench_sub.add_parser("throughput", help="offline engine throughput: all requests at once")
    throughput.add_arguments(throughput_parser)
    throughput_parser.set_defaults(func=throughput.main)
    serve_parser = bench_sub.add_parser("serve", help="online load generator against any OpenAI-compatible server")
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(func=serve.main)

    from benchmarks import plan  # arithmetic only: no torch, no triton
    plan_parser = sub.add_parser("plan", help="per-GPU weights, KV capacity and a roofline projection of a "
                                              "deployment (no GPU needed)")
    plan.add_arguments(plan_parser)
    plan_parser.set_defaults(func=plan.run)


def _run_kernels(args) -> None:
    from benchmarks.kernels import main
    main(reduced=args.reduced, only=args.only, iters=args.iters, json_path=args.json)
