"""`sparseinfer run` (being written)."""


def register(sub):
    p = sub.add_parser("run", help="(not available yet)")
    p.set_defaults(func=_run)


def _run(args):
    raise NotImplementedError("sparseinfer run is not written yet")
