"""`sparseinfer demo` (being written)."""


def register(sub):
    p = sub.add_parser("demo", help="(not available yet)")
    p.set_defaults(func=_run)


def _run(args):
    raise NotImplementedError("sparseinfer demo is not written yet")
