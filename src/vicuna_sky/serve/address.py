"""`python -m vicuna_sky.serve.address --port 8001`: the URL a controller elsewhere reaches this
worker at, printed on stdout.

SkyPilot's SKYPILOT_NODE_IPS holds the node's private address, which a controller in another
region, cloud or network cannot reach. The public address comes from the cloud's metadata server
(AWS IMDSv2 `public-ipv4`, GCP `access-configs/0/external-ip`), asked only on the cloud the
node runs on (`vicuna_sky.spot.current_cloud`). The URLs are configurable
(`VICUNA_SKY_AWS_TOKEN_URL`, `VICUNA_SKY_AWS_PUBLIC_IP_URL`, `VICUNA_SKY_GCP_EXTERNAL_IP_URL`) so
tests point them at a server on 127.0.0.1. When no public address can be had (another cloud, a
VM without one), the private address is used and a warning says the controller must share the
network. `--worker-address` (WORKER_ADDRESS in sky/serve-worker.yaml) overrides all of this.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

from vicuna_sky.spot import current_cloud

log = logging.getLogger("vicuna_sky.serve.address")


@dataclass(frozen=True)
class MetadataUrls:
    aws_token: str = "http://169.254.169.254/latest/api/token"
    aws_public_ip: str = "http://169.254.169.254/latest/meta-data/public-ipv4"
    gcp_external_ip: str = (
        "http://metadata.google.internal/computeMetadata/v1/instance/network-interfaces/0/"
        "access-configs/0/external-ip"
    )

    @classmethod
    def from_env(cls) -> MetadataUrls:
        default = cls()
        return cls(
            aws_token=os.environ.get("VICUNA_SKY_AWS_TOKEN_URL", default.aws_token),
            aws_public_ip=os.environ.get("VICUNA_SKY_AWS_PUBLIC_IP_URL", default.aws_public_ip),
            gcp_external_ip=os.environ.get(
                "VICUNA_SKY_GCP_EXTERNAL_IP_URL", default.gcp_external_ip
            ),
        )


def _request(url: str, headers: dict[str, str], method: str = "GET") -> str | None:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            return response.read().decode(errors="replace").strip()
    except (urllib.error.URLError, OSError) as e:
        log.debug("%s: %s", url, e)
        return None


def _ip(text: str | None) -> str | None:
    """The answer only if it is an IP address (a VM without a public IP gets 404 or nothing)."""
    try:
        return str(ipaddress.ip_address((text or "").strip()))
    except ValueError:
        return None


def public_ip(cloud: str, urls: MetadataUrls) -> str | None:
    """This VM's public IP from its cloud's metadata server, or None."""
    if cloud == "aws":
        token = _request(urls.aws_token, {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, "PUT")
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        return _ip(_request(urls.aws_public_ip, headers))
    if cloud == "gcp":
        return _ip(_request(urls.gcp_external_ip, {"Metadata-Flavor": "Google"}))
    return None


def private_ip() -> str | None:
    """The head node's address as SkyPilot gives it (first line of SKYPILOT_NODE_IPS)."""
    lines = os.environ.get("SKYPILOT_NODE_IPS", "").split()
    return lines[0] if lines else None


def worker_url(port: int, cloud: str | None = None, urls: MetadataUrls | None = None) -> str:
    """http://<public IP>:port, else http://<private IP>:port with a warning."""
    cloud = current_cloud() if cloud is None else cloud
    ip = public_ip(cloud, urls or MetadataUrls.from_env())
    if ip is None:
        ip = private_ip() or "127.0.0.1"
        log.warning(
            "no public IP from the %s metadata server: announcing %s, which only a controller "
            "in the same network reaches (set WORKER_ADDRESS to override)",
            cloud or "(no cloud)",
            ip,
        )
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vicuna_sky.serve.address")
    p.add_argument("--port", type=int, required=True, help="the port the worker listens on")
    p.add_argument("--cloud", default=None, help="aws or gcp (default: from SkyPilot's env)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    print(worker_url(args.port, args.cloud))


if __name__ == "__main__":
    main()
