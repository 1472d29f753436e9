"""Walking a jaxpr for structural tests: every equation, those of nested jaxprs (scan and while bodies, cond
branches, remat, custom rules) included."""


def equations(jaxpr):
    """Every equation of ``jaxpr`` and, depth first, of each jaxpr held in an equation's parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)
