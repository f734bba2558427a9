"""`sparseinfer sweep` (being written)."""


def register(sub):
    p = sub.add_parser("sweep", help="(not available yet)")
    p.set_defaults(func=_run)


def _run(args):
    raise NotImplementedError("sparseinfer sweep is not written yet")
