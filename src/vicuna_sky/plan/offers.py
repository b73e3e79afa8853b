"""From zone prices to region offers a user can trust.

A region's spot price is the median of its zones' prices, with their count and range, never the
single cheapest zone: spot prices differ by zone (one us-east-1 p4d zone at 11 % of on-demand
while the others are 3x that), and a run that is preempted moves to another zone. A zone more
than `OUTLIER_RATIO` times cheaper than its region's median is flagged and not taken. Local Zones,
Wavelength Zones and GCP's special zones are left out unless asked for (they need opting in and
are priced apart from their region).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from vicuna_sky.plan.catalog import ZonePrice

OUTLIER_RATIO = 2.0


@dataclass(frozen=True)
class RegionPrice:
    cloud: str
    region: str
    instance_type: str
    gpu: str
    count: int
    spot: float | None
    """Median spot price per node-hour over the region's zones, outliers left out; None: no
    spot offer."""
    on_demand: float | None
    zones: int
    """Zones the spot median is taken over (outliers not counted)."""
    spot_low: float | None
    spot_high: float | None
    outliers: tuple[tuple[str, float], ...] = ()
    """(zone, spot price) more than OUTLIER_RATIO below the median: flagged, not taken."""
    left_out: tuple[tuple[str, str, float | None], ...] = ()
    """(zone, kind, spot price) of Local/Wavelength/special zones not counted."""
    cheapest_spot: float | None = None
    """The cheapest spot price of any zone, the ones left out included: SkyPilot's optimizer
    prices a region at it."""

    def to_dict(self) -> dict:
        return {
            "cloud": self.cloud,
            "region": self.region,
            "instance_type": self.instance_type,
            "gpu": self.gpu,
            "gpus_per_node": self.count,
            "spot_hourly_median": self.spot,
            "on_demand_hourly": self.on_demand,
            "spot_zones": self.zones,
            "spot_hourly_range": [self.spot_low, self.spot_high],
            "outlier_zones": [{"zone": z, "spot_hourly": p} for z, p in self.outliers],
            "left_out_zones": [
                {"zone": z, "kind": k, "spot_hourly": p} for z, k, p in self.left_out
            ],
        }


def regions(zones: list[ZonePrice], special_zones: bool = False) -> list[RegionPrice]:
    """One offer per (cloud, region, instance type), priced on its typical zone."""
    grouped: dict[tuple, list[ZonePrice]] = defaultdict(list)
    for z in zones:
        grouped[(z.cloud, z.region, z.instance_type, z.gpu, z.count)].append(z)
    out = []
    for (cloud, region, instance_type, gpu, count), rows in sorted(grouped.items()):
        counted = [z for z in rows if special_zones or not z.special]
        left_out = tuple((z.zone, z.special, z.spot) for z in rows if z not in counted)
        spots = [z.spot for z in counted if z.spot is not None]
        on_demand = [z.on_demand for z in counted if z.on_demand is not None]
        median = statistics.median(spots) if spots else None
        outliers = tuple(
            (z.zone, z.spot)
            for z in counted
            if z.spot is not None and median is not None and z.spot * OUTLIER_RATIO < median
        )
        if not counted or (not spots and not on_demand):
            continue
        if outliers:  # the typical price is the other zones'
            flagged = {zone for zone, _ in outliers}
            spots = [z.spot for z in counted if z.spot is not None and z.zone not in flagged]
            median = statistics.median(spots)
        any_spot = [z.spot for z in rows if z.spot is not None]
        out.append(
            RegionPrice(
                cloud=cloud,
                region=region,
                instance_type=instance_type,
                gpu=gpu,
                count=count,
                spot=median,
                on_demand=statistics.median(on_demand) if on_demand else None,
                zones=len(spots),
                spot_low=min(spots) if spots else None,
                spot_high=max(spots) if spots else None,
                outliers=outliers,
                left_out=left_out,
                cheapest_spot=min(any_spot) if any_spot else None,
            )
        )
    return out
