"""Data that crosses clouds, and what it costs: a run on one cloud whose bucket is on another
uploads every checkpoint across, downloads one at every relaunch, and exports the model across.

By default the planner avoids it: offers are restricted to the bucket's cloud (`--any-cloud`
widens them). Offers on another cloud are charged at the published internet egress rates below,
by the cloud the bytes leave.
"""

from __future__ import annotations

EGRESS_USD_PER_GB = {"aws": 0.09, "gcp": 0.12, "azure": 0.087}
"""Internet egress, USD per GB, first tier, North America."""
SOURCE = (
    "published list prices as of 2024 (AWS EC2 'Data Transfer OUT to the Internet', first 10 TB "
    "per month: $0.09/GB; Google Cloud network pricing, Premium Tier internet egress, 0-1 TiB: "
    "$0.12/GB; Azure bandwidth, internet egress, first 10 TB: $0.087/GB); check your contract"
)

BUCKET_CLOUD = {"s3": "aws", "gs": "gcp", "az": "azure", "https": "azure"}
"""Bucket URL scheme -> the cloud that stores it. r2:// (Cloudflare charges no egress) and
file:// have none: no cloud is closer to them than another."""


def bucket_cloud(bucket: str) -> str | None:
    scheme = bucket.partition("://")[0].lower()
    return BUCKET_CLOUD.get(scheme)


def cost(
    compute_cloud: str,
    store_cloud: str | None,
    checkpoint_gb: float,
    checkpoints: float,
    relaunches: float,
    export_gb: float,
) -> float:
    """USD of cross-cloud traffic for one run (0 on the bucket's own cloud)."""
    if store_cloud is None or compute_cloud == store_cloud:
        return 0.0
    out = EGRESS_USD_PER_GB.get(compute_cloud, max(EGRESS_USD_PER_GB.values()))
    back = EGRESS_USD_PER_GB.get(store_cloud, max(EGRESS_USD_PER_GB.values()))
    return (checkpoints * checkpoint_gb + export_gb) * out + relaunches * checkpoint_gb * back
