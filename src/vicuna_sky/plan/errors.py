"""The planner's one error: bad input or a catalog it cannot use, said in one line."""

from vicuna_sky.errors import VicunaSkyError


class PlanError(VicunaSkyError, ValueError):
    """A plan that cannot be made (unknown GPU or region, unreadable catalog, no token count).
    A ValueError too: the launcher treats a missing plan as a reason, not a crash."""
