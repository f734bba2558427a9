"""`sparseinfer inspect` (being written)."""


def register(sub):
    p = sub.add_parser("inspect", help="(not available yet)")
    p.set_defaults(func=_run)


def _run(args):
    raise NotImplementedError("sparseinfer inspect is not written yet")
