"""GPU offers zone by zone, read from SkyPilot's catalog files (v8 `vms.csv`).

SkyPilot's own catalog API (`sky.catalog.list_accelerators`) keeps one price per region, the
cheapest zone's, which is what lets an outlier zone or a Local Zone set a region's price; the
planner needs every zone, so it reads the same files SkyPilot reads. Where SkyPilot would
download a missing file, the planner asks SkyPilot to (its messages go to the screen only with
`verbose`). A directory given explicitly (a saved copy, `vicuna-sky plan --catalog DIR`) is read
as it is and never fetched.

GCP lists a GPU and the VM that hosts it on separate rows (the GPU row has no instance type); a
node's price is the sum, with the host type SkyPilot pairs with each GPU
(`sky.catalog.gcp_catalog._ACC_INSTANCE_TYPE_DICTS`: A100 on a2-highgpu, L4 on g2-standard...).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vicuna_sky.errors import one_line
from vicuna_sky.plan.errors import PlanError

DEFAULT_CLOUDS = ("aws", "gcp")
"""Clouds planned for when the recipe names none: those whose catalogs the planner reads."""

COLUMNS = ("InstanceType", "AcceleratorName", "AcceleratorCount", "Region", "AvailabilityZone")
PRICE_COLUMNS = ("Price", "SpotPrice")

# An AWS Availability Zone id is <region code>-az<n> (use1-az4); a Local Zone adds its city
# (use1-atl2-az1), a Wavelength Zone its carrier (...-wl1-...). A GCP zone is <region>-<letter>.
_AWS_ZONE = re.compile(r"^[a-z]+\d+-az\d+$")


@dataclass(frozen=True)
class ZonePrice:
    """One node of `count` GPUs in one zone, per hour."""

    cloud: str
    region: str
    zone: str
    instance_type: str
    gpu: str
    """The catalog's name for the GPU."""
    count: int
    spot: float | None
    on_demand: float | None
    special: str = ""
    """'' for an ordinary zone, else what it is ('Local Zone', 'Wavelength Zone', ...)."""


def special_zone(cloud: str, region: str, zone: str) -> str:
    """What kind of zone this is when it is not an ordinary one of its region, else ''."""
    if cloud == "aws":
        if _AWS_ZONE.match(zone):
            return ""
        return "Wavelength Zone" if "-wl" in zone else "Local Zone"
    if cloud == "gcp":
        return "" if re.fullmatch(rf"{re.escape(region)}-[a-z]", zone) else "special zone"
    return ""


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Keep SkyPilot's own output (fetch messages, spinners, `<sky-payload>` markup) off the
    terminal: its log handlers hold the real stdout/stderr, so the file descriptors move."""
    if verbose:
        yield
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def catalog_path(cloud: str, directory: Path | None, verbose: bool = False) -> Path:
    """The cloud's vms.csv: in `directory` as it is, or SkyPilot's own (fetched when missing)."""
    if directory is not None:
        path = directory / cloud / "vms.csv"
        if not path.is_file():
            raise PlanError(f"no {cloud} catalog in {directory} (expected {path})")
        return path
    from sky.catalog import common

    path = Path(common.get_catalog_path(f"{cloud}/vms.csv"))
    if not path.is_file():
        try:
            with quiet(verbose):
                common.read_catalog(f"{cloud}/vms.csv")._load_df()  # SkyPilot downloads it
        except Exception as e:  # offline: requests' ConnectionError, SkyPilot's own errors
            raise PlanError(f"cannot read SkyPilot's catalog for {cloud}: {one_line(e)}") from None
    return path


def read(path: Path) -> object:
    """The catalog as a DataFrame; a file that is not one is an error naming it."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"{path}: not a readable SkyPilot catalog ({why})") from None
    missing = [c for c in COLUMNS + PRICE_COLUMNS if c not in df.columns]
    if missing:
        raise PlanError(f"{path}: not a SkyPilot v8 catalog (no column {', '.join(missing)})")
    for column in (*PRICE_COLUMNS, "AcceleratorCount"):
        if not pd.api.types.is_numeric_dtype(df[column]):
            raise PlanError(f"{path}: column {column} has values that are not numbers")
    return df


def _price(value: object) -> float | None:
    try:
        price = float(value)
    except (TypeError, ValueError):
        return None
    return price if math.isfinite(price) and price > 0 else None


def zone_prices(cloud: str, df: object, count: int) -> list[ZonePrice]:
    """Every (GPU type, zone) of this catalog with `count` GPUs per node."""
    gpus = df[df["AcceleratorName"].notna() & (df["AcceleratorCount"] == count)]
    if cloud != "gcp":
        return [
            ZonePrice(
                cloud,
                row.Region,
                row.AvailabilityZone,
                row.InstanceType,
                row.AcceleratorName,
                count,
                _price(row.SpotPrice),
                _price(row.Price),
                special_zone(cloud, row.Region, row.AvailabilityZone),
            )
            for row in gpus.itertuples()
            if isinstance(row.InstanceType, str) and not row.AcceleratorName.startswith("tpu-")
        ]
    hosts = _gcp_hosts()
    vms = df[df["InstanceType"].notna()]
    by_zone = {(r.InstanceType, r.AvailabilityZone): r for r in vms.itertuples()}
    out = []
    for acc in gpus[gpus["InstanceType"].isna()].itertuples():
        types = hosts.get(acc.AcceleratorName, {}).get(count, [])
        host = min(
            (
                by_zone[(t, acc.AvailabilityZone)]
                for t in types
                if (t, acc.AvailabilityZone) in by_zone
            ),
            key=lambda r: _price(r.Price) or math.inf,
            default=None,
        )
        if host is None:
            continue  # SkyPilot offers no GPU without its host VM in that zone either
        spot = _price(acc.SpotPrice), _price(host.SpotPrice)
        on_demand = _price(acc.Price), _price(host.Price)
        out.append(
            ZonePrice(
                cloud,
                acc.Region,
                acc.AvailabilityZone,
                host.InstanceType,
                acc.AcceleratorName,
                count,
                None if None in spot else sum(spot),
                None if None in on_demand else sum(on_demand),
                special_zone(cloud, acc.Region, acc.AvailabilityZone),
            )
        )
    return out


def _gcp_hosts() -> dict[str, dict[int, list[str]]]:
    """GPU -> count -> host VM types, as SkyPilot pairs them."""
    from sky.catalog import gcp_catalog

    return gcp_catalog._ACC_INSTANCE_TYPE_DICTS
