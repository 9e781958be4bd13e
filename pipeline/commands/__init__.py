"""One module per `foldtune` subcommand.

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
They are imported only when their subcommand runs, so `foldtune --help` stays fast.
"""
