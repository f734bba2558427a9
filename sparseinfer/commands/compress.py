"""`sparseinfer compress` (being written)."""


def register(sub):
    p = sub.add_parser("compress", help="(not available yet)")
    p.set_defaults(func=_run)


def _run(args):
    raise NotImplementedError("sparseinfer compress is not written yet")
