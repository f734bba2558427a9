"""`sparseinfer bench` (being written)."""


def register(sub):
    p = sub.add_parser("bench", help="(not available yet)")
    p.set_defaults(func=_run)


def _run(args):
    raise NotImplementedError("sparseinfer bench is not written yet")
