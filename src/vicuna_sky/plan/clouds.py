"""Which clouds can launch: what `sky check` recorded in SkyPilot's state (~/.sky), read without
running the check again (that would ask every cloud's API). Callers and tests may pass the set
themselves instead (`make_plan(..., enabled=...)`)."""

from __future__ import annotations

from vicuna_sky.plan.catalog import quiet


def enabled_clouds(verbose: bool = False) -> frozenset[str]:
    """Lower-case names of the clouds `sky check` enabled for compute; empty when none (or when
    `sky check` never ran)."""
    try:
        with quiet(verbose):
            from sky.clouds import cloud as sky_cloud

            from sky import global_user_state, skypilot_config

            workspace = skypilot_config.get_active_workspace()
            clouds = global_user_state.get_cached_enabled_clouds(
                sky_cloud.CloudCapability.COMPUTE, workspace
            )
    except Exception:  # a state database SkyPilot cannot open: nothing is known to be enabled
        return frozenset()
    return frozenset(str(c).lower() for c in clouds)
