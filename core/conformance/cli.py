"""`moetier conformance`."""


def register(sub, common):
    p = sub.add_parser("conformance", help="run the conformance suite on backends")
    common(p)
    p.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    p.set_defaults(func=lambda args: 0)
