"""Keep the cloud SDKs this process (and its children) loads on 127.0.0.1.

The demo, the chaos harness and the tests price runs with SkyPilot's catalog, and SkyPilot's AWS
catalog asks STS who the caller is before it reads the availability zones: with the dummy local
keys that request would be signed and sent to sts.us-east-1.amazonaws.com. Pointing every AWS
service (and the GCE metadata server, the Hugging Face hub, telemetry) at a closed loopback port
makes each such call fail at once, on this machine, as it does without credentials; a caller
that needs a local server (moto, a metadata server) sets its own service-specific variable after.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

NOWHERE = "127.0.0.1:9"
"""The discard port on loopback: nothing listens there, so a connection is refused at once."""

LOOPBACK_SDK_ENV = {
    # boto3 takes AWS_ENDPOINT_URL for every service; AWS_ENDPOINT_URL_<SERVICE> wins over it.
    "AWS_ENDPOINT_URL": f"http://{NOWHERE}",
    "AWS_ENDPOINT_URL_STS": f"http://{NOWHERE}",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": NOWHERE,
    "GCE_METADATA_IP": NOWHERE,
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    # A WANDB_API_KEY in the user's shell: W&B records offline (`wandb sync` sends it later),
    # and its crash reports (Sentry) stay off.
    "WANDB_MODE": "offline",
    "WANDB_BASE_URL": f"http://{NOWHERE}",
    "WANDB_ERROR_REPORTING": "false",
}


def stay_on_loopback(environ: MutableMapping[str, str] | None = None) -> None:
    """Point the SDKs at loopback in `environ` (os.environ by default), overriding what is set:
    a local run must not reach a real endpoint a user's shell happens to configure."""
    target = os.environ if environ is None else environ
    target.update(LOOPBACK_SDK_ENV)
