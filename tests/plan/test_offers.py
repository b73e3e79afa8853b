"""Zone rows from the real catalog fixture, and the region offers made of them."""

import statistics

import pytest

from vicuna_sky.plan import catalog, offers
from vicuna_sky.plan.errors import PlanError

from .conftest import REAL_CATALOG


def zones(cloud: str, count: int = 8) -> list[catalog.ZonePrice]:
    df = catalog.read(catalog.catalog_path(cloud, REAL_CATALOG))
    return catalog.zone_prices(cloud, df, count)


def region(rows, cloud, name, gpu, special_zones=False) -> offers.RegionPrice:
    (found,) = [
        p
        for p in offers.regions(rows, special_zones)
        if (p.cloud, p.region, p.gpu) == (cloud, name, gpu)
    ]
    return found


def test_gcp_prices_a_node_as_gpu_plus_its_host_vm():
    # us-central1-a: 8 x A100 23.47126 + a2-highgpu-8g 5.91582 on demand; 11.4728 + 2.958 spot.
    (z,) = [z for z in zones("gcp") if z.zone == "us-central1-a" and z.gpu == "A100"]
    assert z.instance_type == "a2-highgpu-8g"
    assert z.on_demand == pytest.approx(23.47126 + 5.91582)
    assert z.spot == pytest.approx(11.4728 + 2.958)
    # L4 is hosted on g2-standard-96, H100 on a3-highgpu-8g (SkyPilot's pairing).
    hosts = {z.gpu: z.instance_type for z in zones("gcp")}
    assert hosts["L4"] == "g2-standard-96" and hosts["H100"] == "a3-highgpu-8g"


def test_an_outlier_zone_is_flagged_and_not_taken():
    # p4d.24xlarge in us-east-1: use1-az1 at $2.47/h (11 % of on demand), the others ~$8.
    p = region(zones("aws"), "aws", "us-east-1", "A100")
    assert p.outliers == (("use1-az1", pytest.approx(2.4655)),)
    assert p.spot == pytest.approx(statistics.median([8.1915, 8.1203, 7.8799]))
    assert p.zones == 3 and p.spot_low == pytest.approx(7.8799)
    assert p.cheapest_spot == pytest.approx(2.4655)  # what SkyPilot's optimizer would price


def test_local_zones_are_left_out_unless_asked():
    rows = zones("aws")
    assert catalog.special_zone("aws", "us-east-1", "use1-atl2-az1") == "Local Zone"
    assert catalog.special_zone("aws", "us-east-1", "use1-wl1-bos-wlz1") == "Wavelength Zone"
    assert catalog.special_zone("gcp", "us-south1", "us-south1-ai1b") == "special zone"
    assert catalog.special_zone("gcp", "us-south1", "us-south1-b") == ""
    # p5.48xlarge in us-east-1: six zones and the Atlanta Local Zone at $10.24.
    p = region(rows, "aws", "us-east-1", "H100")
    assert p.left_out == (("use1-atl2-az1", "Local Zone", pytest.approx(10.2397)),)
    assert p.spot == pytest.approx((21.1543 + 25.7522) / 2) and p.zones == 6
    # The range shown is the counted zones' only; the Local Zone's $10.24 is not the cheapest
    # offer of the region (only SkyPilot's own optimizer would price it there).
    counted = [z.spot for z in rows if (z.region, z.gpu) == ("us-east-1", "H100")
               and not z.special and z.spot is not None]  # fmt: skip
    assert len(counted) == 6 and p.spot_low == pytest.approx(min(counted))
    assert p.spot_low > 1.5 * 10.2397
    assert p.spot_high == pytest.approx(max(counted))
    assert p.cheapest_spot == pytest.approx(10.2397)
    # Asked for, the Local Zone counts, and at under half the median it is an outlier.
    with_local = region(rows, "aws", "us-east-1", "H100", special_zones=True)
    assert with_local.outliers == (("use1-atl2-az1", pytest.approx(10.2397)),)
    assert with_local.zones == 6 and not with_local.left_out


def test_a_malformed_or_missing_catalog_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "aws" / "vms.csv"
    bad.parent.mkdir()
    bad.write_text("InstanceType,Price\np4d.24xlarge,cheap\n")
    with pytest.raises(PlanError, match=rf"{bad}: not a SkyPilot v8 catalog \(no column"):
        catalog.read(bad)
    bad.write_text(
        "InstanceType,AcceleratorName,AcceleratorCount,Region,AvailabilityZone,Price,SpotPrice\n"
        "p4d.24xlarge,A100,8,us-east-1,use1-az1,cheap,1.0\n"
    )
    with pytest.raises(PlanError, match=rf"{bad}: column Price has values that are not numbers"):
        catalog.read(bad)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError, match=rf"{bad}: not"):
        catalog.read(bad)
    with pytest.raises(PlanError, match=r"no gcp catalog in .* \(expected .*gcp/vms.csv\)"):
        catalog.catalog_path("gcp", tmp_path)
